//! The `hydrafy` binary. Everything it does is in the library, which the
//! tests, the benchmarks and the fuzz target share: see [`hydrafy::main`].

fn main() -> std::process::ExitCode {
    hydrafy::main()
}
