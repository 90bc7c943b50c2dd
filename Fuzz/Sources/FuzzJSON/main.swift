// libFuzzer provides main; this file only keeps SwiftPM's executable target shape.
