//! The `bulwark` binary; everything lives in the library (see `bulwark::cli`).

fn main() -> std::process::ExitCode {
    bulwark::cli::main()
}
