//! The `static-ingress` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    static_ingress::cli::main()
}
