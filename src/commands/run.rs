//! `mvrefresh run`: the daemon, until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use crate::cli::EXIT_CONFIG;
use crate::config::Config;
use crate::daemon;
use crate::stats::Stats;

pub async fn execute(config: Config) -> anyhow::Result<ExitCode> {
    if let Some(problem) = config.http.exposure_problem() {
        eprintln!("mvrefresh: {problem}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    daemon::run(
        config,
        Arc::new(Stats::default()),
        crate::shutdown::signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
