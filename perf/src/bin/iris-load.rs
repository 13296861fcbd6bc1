//! `iris-load`: the Iris load generator. See `iris_perf::load` and `iris-load --help`.

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    iris_perf::load::main_with_args(std::env::args_os())
}
