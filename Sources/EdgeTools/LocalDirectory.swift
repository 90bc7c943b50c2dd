import Glibc

/// A throwaway OpenLDAP directory of one's own (the sandbox, the LDAP
/// source tests): Debian's slapd configured by a slapd.conf written into a
/// temporary directory (mdb database, the syncprov overlay for syncrepl,
/// and a small schema for Active Directory's attributes), listening on
/// loopback. Never the system's slapd.
public enum LocalDirectory {
    public static let suffix = "dc=example,dc=org"
    public static let admin = "cn=admin,dc=example,dc=org"
    public static let password = "secret"
    /// Where Debian puts slapd's schema files and modules.
    static let schemaDir = "/etc/ldap/schema", moduleDir = "/usr/lib/ldap"

    /// The slapd.conf of a directory whose database is `database` (a
    /// directory that exists); `tls`: TLS directives, if any.
    public static func slapdConfig(database: String, pidFile: String, tls: String = "") -> String {
        """
        include \(schemaDir)/core.schema
        include \(schemaDir)/cosine.schema
        include \(schemaDir)/inetorgperson.schema
        attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'userAccountControl' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.2 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.3 NAME 'userPrincipalName' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.4 NAME 'uSNChanged' EQUALITY integerMatch ORDERING integerOrderingMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.5 NAME 'objectGUID' EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.6 NAME 'employeeID' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
        attributetype ( 1.3.6.1.4.1.55555.1.7 NAME 'department' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
        objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'adAccount' AUXILIARY MAY ( userAccountControl $ sAMAccountName $ userPrincipalName $ uSNChanged $ objectGUID $ employeeID $ department ) )
        \(tls)pidfile \(pidFile)
        modulepath \(moduleDir)
        moduleload back_mdb
        moduleload syncprov
        sizelimit unlimited
        database mdb
        maxsize 1073741824
        suffix "\(suffix)"
        rootdn "\(admin)"
        rootpw \(password)
        directory \(database)
        index objectClass,entryCSN,entryUUID eq
        overlay syncprov
        syncprov-checkpoint 10 1
        syncprov-sessionlog 10000

        """
    }

    /// The programs a local directory needs (slapd and slapadd, next to
    /// each other; ldapsearch and ldapmodify), or why it cannot run here.
    public static func programs(slapd: String?) -> Result<
        (slapd: String, slapadd: String, ldapsearch: String, ldapmodify: String), BenchError
    > {
        if let slapd, access(slapd, X_OK) != 0 { return .failure(BenchError("no slapd at \(slapd)")) }
        guard let slapd = slapd ?? findExecutable("slapd", candidates: ["/usr/sbin/slapd"]) else {
            return .failure(BenchError("slapd is not installed (make deps installs slapd and ldap-utils)"))
        }
        let sbin = String(slapd[..<(slapd.lastIndex(of: "/") ?? slapd.startIndex)])
        guard access(sbin + "/slapadd", X_OK) == 0 else { return .failure(BenchError("no slapadd next to \(slapd)")) }
        guard let search = findExecutable("ldapsearch", candidates: ["/usr/bin/ldapsearch"]),
            let modify = findExecutable("ldapmodify", candidates: ["/usr/bin/ldapmodify"])
        else { return .failure(BenchError("ldap-utils (ldapsearch, ldapmodify) is not installed")) }
        for f in ["\(schemaDir)/inetorgperson.schema", "\(moduleDir)/syncprov.la", "\(moduleDir)/back_mdb.la"] where access(f, R_OK) != 0 {
            return .failure(BenchError("\(f) is missing (Debian's slapd package provides it)"))
        }
        return .success((slapd, sbin + "/slapadd", search, modify))
    }
}
