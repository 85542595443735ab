//! `mvrefresh status`: per view, last success, duration, last error and what is pending.

use std::process::ExitCode;

use crate::config::Config;
use crate::db::Db;
use crate::status;

pub async fn execute(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let db = Db::new(&config.database)?;
    let client = db.connect_simple("mvrefresh-status").await?;
    let s = status::status(&client, &config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render_table(&s));
    }
    Ok(ExitCode::SUCCESS)
}
