import Foundation
import PackagePlugin

/// Generates `Version.swift` from the package's `VERSION` file, the one
/// version source (`--version`, the .deb packages, the sandbox banner).
@main
struct VersionPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let version = context.package.directoryURL.appending(path: "VERSION")
        let output = context.pluginWorkDirectoryURL.appending(path: "Version.swift")
        let script =
            #"printf '// Generated from VERSION by the VersionPlugin.\n/// The release version, from the VERSION file.\npublic let scimEdgeVersion = "%s"\n' "$(tr -d ' \n' < "$0")" > "$1""#
        return [
            .buildCommand(
                displayName: "Generating Version.swift from VERSION", executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: ["-c", script, version.path, output.path], inputFiles: [version], outputFiles: [output])
        ]
    }
}
