use std::process::ExitCode;

use clap::Parser;
use mvrefresh::cli::{self, Cli, EXIT_CONFIG};
use mvrefresh::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mvrefresh: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    mvrefresh::init_logging(&config.log);
    mvrefresh::install_tls_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mvrefresh")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mvrefresh: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(cli::execute(cli.command, config))
}
