//! The command line: `run`, `check-config`, and one override flag per configuration key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};

use crate::admin::client;
use crate::config::{self, Config, ConfigErrors, Loaded, Origin, Override, keys};
use crate::server::{Exit, Server, StartError};
use crate::{lifecycle, logging};

/// Exit codes, as documented in the README.
pub mod exit {
    /// Clean exit, including after a complete drain.
    pub const OK: u8 = 0;
    /// A runtime failure (a listener could not be bound, ...), or a drain cut short by a second
    /// signal.
    pub const FAILURE: u8 = 1;
    /// The command line could not be parsed (clap's code).
    pub const USAGE: u8 = 2;
    /// The configuration is invalid (EX_CONFIG from sysexits.h).
    pub const CONFIG: u8 = 78;
}

#[derive(Parser, Debug)]
#[command(
    name = "static-ingress",
    version,
    about = "A TCP passthrough proxy that gives a DNS-addressed backend (such as an AWS ELB) a fixed set of IPs.",
    after_help = "Every configuration key can be set in the config file, as an environment variable \
STATIC_INGRESS_<SECTION>_<KEY>, or as a flag --<section>-<key>; a flag beats the environment, \
which beats the file, which beats the default. `static-ingress run --help` lists them all."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the proxy and its admin server until SIGTERM or SIGINT, then drain.
    Run(RunArgs),
    /// Check the configuration and print the effective settings; exit 0 if valid, 78 if not.
    CheckConfig(CheckArgs),
    /// Reload the running proxy with process id PID (what the unit's ExecReload runs): check
    /// its configuration files as it will read them (with the flags and environment it
    /// started with), send SIGHUP, and wait for its /status to report the outcome. Exit 0
    /// once applied, 78 if the files are invalid (the proxy is then not signalled, or kept
    /// its running configuration), 1 if the proxy could not apply them (e.g. a new
    /// listener's port is taken), is draining, is not a static-ingress, or could not be
    /// followed.
    Reload(ReloadArgs),
    /// Claim this instance's Elastic IP once (the [eip] settings; eip.enabled is not needed),
    /// print what was found and done, and exit: 0 when the address is this instance's, or
    /// 10-17 naming what to fix (see the README).
    ClaimEip(ClaimArgs),
    /// Show what a running proxy thinks, from its admin server's /status: health and why,
    /// each backend with its DNS answer and addresses, the Elastic IP, draining, connections.
    /// Exit 0 if healthy, 3 if it answers unhealthy (draining included), 4 if no static-ingress
    /// answers at the admin address.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The admin server to ask, IP:PORT. Without it, the config file's admin.operator_listen
    /// addresses, then its admin.listen (on loopback for a wildcard): the first that answers;
    /// without a config that loads, 127.0.0.1:9002 then 127.0.0.1:9001.
    #[arg(long, value_name = "IP:PORT")]
    pub admin: Option<std::net::SocketAddr>,
    /// Config file whose admin addresses to use. Without it, /etc/static-ingress/static-ingress.toml
    /// is read if it exists.
    #[arg(short, long, env = "STATIC_INGRESS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Colour: auto (only on a terminal, and not with NO_COLOR set), always or never.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub color: String,
    /// Print the /status JSON as it came instead of the table (same exit codes).
    #[arg(long)]
    pub json: bool,
    /// The environment file the systemd unit gives the proxy (its EnvironmentFile=): the
    /// STATIC_INGRESS_* settings there apply as they do to the proxy, over this shell's (which
    /// the unit's proxy never sees). A missing file is read as empty.
    #[arg(long, value_name = "FILE", default_value = UNIT_ENV_FILE)]
    pub env_file: PathBuf,
}

/// The environment file of the packaged systemd unit.
pub const UNIT_ENV_FILE: &str = "/etc/static-ingress/static-ingress.env";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Config file. Without it, /etc/static-ingress/static-ingress.toml is read if it exists.
    #[arg(short, long, env = "STATIC_INGRESS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Config file to check. Without it, /etc/static-ingress/static-ingress.toml is read if it
    /// exists.
    #[arg(value_name = "FILE", env = "STATIC_INGRESS_CONFIG")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// The proxy's process id (systemd passes $MAINPID). Its command line and environment
    /// (from /proc) say which files and overrides it reads.
    #[arg(long, value_name = "PID")]
    pub pid: i32,
    /// How long to wait for the proxy to report the reload's outcome.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_wait)]
    pub wait: std::time::Duration,
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    let d = config::value::duration(s)?;
    if d.is_zero() || d > std::time::Duration::from_secs(600) {
        return Err("from 1ms to 10m".into());
    }
    Ok(d)
}

#[derive(Args, Debug)]
pub struct ClaimArgs {
    /// Config file. Without it, /etc/static-ingress/static-ingress.toml is read if it exists.
    #[arg(short, long, env = "STATIC_INGRESS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Find the instance, the allocation and the address's holder, and ask EC2 whether the
    /// association would be allowed (DryRun), but change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// One optional flag per key in [`keys::KEYS`], each also readable from its environment variable.
#[derive(Debug, Default, Clone)]
pub struct Overrides(pub Vec<Override>);

const OVERRIDE_HEADING: &str = "Configuration (flag > environment > file > default)";

impl Args for Overrides {
    fn augment_args(mut cmd: Command) -> Command {
        for key in keys::KEYS {
            let default = key.default.map_or("required".to_string(), |d| format!("default: {d}"));
            cmd = cmd.arg(
                Arg::new(key.name)
                    .long(key.flag())
                    .env(key.env())
                    .value_name(key.kind.value_name())
                    .help(format!("{} [{default}]", key.doc))
                    .help_heading(OVERRIDE_HEADING)
                    .hide_env_values(false),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Overrides {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut out = Vec::new();
        for key in keys::KEYS {
            if let Some(value) = m.get_one::<String>(key.name) {
                let origin = match m.value_source(key.name) {
                    Some(ValueSource::EnvVariable) => Origin::Env(key.env()),
                    _ => Origin::Flag(key.flag()),
                };
                out.push(Override { key, value: value.clone(), origin });
            }
        }
        Ok(Overrides(out))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// The whole program; `main` only calls this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig(args) => check_config(args),
        Cmd::Run(args) => run(args),
        Cmd::ClaimEip(args) => claim_eip(args),
        Cmd::Reload(args) => reload(&args),
        Cmd::Status(args) => status(&args),
    }
}

fn status(args: &StatusArgs) -> ExitCode {
    use crate::admin::terminal;
    use std::io::IsTerminal;
    let candidates = match args.admin {
        Some(admin) => vec![admin],
        // The admin addresses the proxy of the unit would bind: its files, with the flags'
        // variables from this environment and the unit's environment file. A config that does
        // not load (no backend yet, say) still names no other port: the defaults, the
        // operator's port the fleet template uses first.
        None => {
            let loaded = unit_run_args(args).and_then(|run| {
                load(config_path(run.config).as_ref(), &run.overrides).map_err(|errors| match errors.0.first() {
                    Some(first) => format!("the configuration does not load ({first})"),
                    None => "the configuration does not load".into(),
                })
            });
            match loaded {
                Ok(l) => l.config.admin.status_candidates(),
                Err(why) => {
                    eprintln!("note: {why}; asking the default addresses");
                    vec!["127.0.0.1:9002".parse().expect("a valid address"), "127.0.0.1:9001".parse().expect("valid")]
                }
            }
        }
    };
    let ask = |admin: std::net::SocketAddr| {
        let admin = client::local(admin);
        client::get(admin, "/status").and_then(|(code, body)| match code {
            200 => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .filter(|v| v.get("health").is_some() && v.get("backends").is_some())
                .map(|v| (v, body))
                .ok_or_else(|| format!("{admin}/status is not a static-ingress status")),
            code => Err(format!("{admin}/status answered {code}: {}", body.trim_end())),
        })
    };
    let mut errors = Vec::new();
    let answer = candidates.iter().find_map(|&admin| ask(admin).map_err(|why| errors.push(why)).ok());
    let Some((status, body)) = answer else {
        eprintln!("error: {}", errors.join("; "));
        return ExitCode::from(terminal::exit::UNREACHABLE);
    };
    if args.json {
        println!("{}", body.trim_end());
    } else {
        let colour = match args.color.as_str() {
            "always" => true,
            "never" => false,
            _ => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        print!("{}", terminal::render(&status, colour, now));
    }
    ExitCode::from(if terminal::healthy(&status) { terminal::exit::HEALTHY } else { terminal::exit::UNHEALTHY })
}

/// How the unit runs the proxy, as far as `status` can tell: `run` with the environment file's
/// STATIC_INGRESS_* settings over this environment's (a shell's variables never reach the
/// unit's proxy; a proxy run by hand from this shell has no file to read), and the `--config`
/// given to `status` if any.
fn unit_run_args(args: &StatusArgs) -> Result<RunArgs, String> {
    let file = match std::fs::read_to_string(&args.env_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            eprintln!("note: cannot read {} ({e}); its settings are not applied", args.env_file.display());
            String::new()
        }
    };
    // SAFETY: `status` runs this before it starts any thread (no runtime, no logging), so
    // nothing reads the environment concurrently.
    unsafe {
        for (k, v) in env_file_settings(&file) {
            std::env::set_var(k, v);
        }
    }
    let mut argv = vec![OsString::from("static-ingress"), OsString::from("run")];
    if let Some(config) = &args.config {
        argv.extend([OsString::from("--config"), config.clone().into_os_string()]);
    }
    match Cli::try_parse_from(argv).map(|c| c.command) {
        Ok(Cmd::Run(run)) => Ok(run),
        Ok(_) => Err("`run` parsed as another command".into()),
        Err(e) => Err(format!(
            "the environment ({} included) is not what `run` takes: {}",
            args.env_file.display(),
            e.to_string().lines().next().unwrap_or_default()
        )),
    }
}

/// The STATIC_INGRESS_* settings of a systemd environment file (`KEY=VALUE` lines, `#` and
/// `;` comments, values optionally in matching quotes), in order.
fn env_file_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = ['"', '\''].iter().find_map(|&q| v.strip_prefix(q).and_then(|v| v.strip_suffix(q)));
            (k.trim().to_string(), unquoted.unwrap_or(v).to_string())
        })
        .filter(|(k, _)| k.starts_with("STATIC_INGRESS_"))
        .collect()
}

/// The config file to read and whether it may be missing: the one named (which must exist),
/// else the default path, read if it or its drop-in directory exists.
fn config_path(named: Option<PathBuf>) -> Option<(PathBuf, bool)> {
    match named {
        Some(path) => Some((path, false)),
        None => {
            let path = PathBuf::from(config::DEFAULT_PATH);
            (path.exists() || config::drop_in_dir(&path).exists()).then_some((path, true))
        }
    }
}

fn load(path: Option<&(PathBuf, bool)>, overrides: &Overrides) -> Result<Loaded, ConfigErrors> {
    Config::load_from(path.map(|(p, optional)| (p.as_path(), *optional)), &overrides.0)
}

/// What a load read, for the log and check-config: the file and its drop-ins.
fn files_read(path: &Path, loaded: &Loaded) -> String {
    let mut files = Vec::new();
    if path.exists() {
        files.push(path.display().to_string());
    }
    files.extend(loaded.drop_ins.iter().map(|p| p.display().to_string()));
    if files.is_empty() { "no config file".to_string() } else { files.join(", ") }
}

fn print_errors(errors: &ConfigErrors) {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    let n = errors.0.len();
    eprintln!("configuration invalid: {n} error{}", if n == 1 { "" } else { "s" });
}

fn check_config(args: CheckArgs) -> ExitCode {
    let path = config_path(args.file);
    match load(path.as_ref(), &args.overrides) {
        Ok(loaded) => {
            match &path {
                Some((p, _)) => println!("# effective configuration: {} (valid)", files_read(p, &loaded)),
                None => println!("# effective configuration: no config file, defaults and overrides only (valid)"),
            }
            print!("{}", loaded.render());
            ExitCode::from(exit::OK)
        }
        Err(errors) => {
            print_errors(&errors);
            ExitCode::from(exit::CONFIG)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let path = config_path(args.config.clone());
    let loaded = match load(path.as_ref(), &args.overrides) {
        Ok(l) => l,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::from(exit::CONFIG);
        }
    };
    let files = path.as_ref().map(|(p, _)| files_read(p, &loaded));
    let config = loaded.config;
    logging::init(&config.log);
    match files {
        Some(files) => tracing::info!(files = %files, "configuration loaded"),
        None => tracing::info!("no config file; using defaults and overrides"),
    }
    lifecycle::raise_fd_limit(config.proxy.max_connections, crate::proxy::workers::descriptors_for(&config.proxy));

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let eip = config.eip.clone();
    let code = runtime.block_on(async {
        let server = match Server::bind(config) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %logging::error_chain(&e), "startup failed");
                // A port another process holds, start after start, is reported to Auto
                // Scaling (eip.report_unhealthy_after).
                if let StartError::Bind(b) = &e {
                    crate::eip::unhealthy::failed_start(&eip, &b.source, &e.to_string()).await;
                }
                return exit::FAILURE;
            }
        };
        crate::eip::unhealthy::started(&eip);
        // SIGHUP reads the same file with the same flags and environment (a process cannot
        // re-read its environment: per-deployment settings that must change on reload belong
        // in the file).
        // The path is looked for again each time: a default file or drop-in directory made
        // after the start is read.
        let (named, overrides) = (args.config.clone(), args.overrides.clone());
        let server = server.reload_with(move || load(config_path(named.clone()).as_ref(), &overrides));
        server.watch_own_failures();
        let signals = match lifecycle::signals() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return exit::FAILURE;
            }
        };
        match server.run(signals).await {
            Exit::Drained => exit::OK,
            Exit::Forced => exit::FAILURE,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The last connections' access-log lines, still on their way to stdout.
    if !logging::flush_access(std::time::Duration::from_secs(2)) {
        eprintln!("static-ingress: access-log lines still unwritten at exit were dropped");
    }
    ExitCode::from(code)
}

fn reload(args: &ReloadArgs) -> ExitCode {
    let pid = args.pid;
    if pid <= 0 {
        eprintln!("error: --pid {pid} is not a process id");
        return ExitCode::from(exit::USAGE);
    }
    // A mistyped pid must not get a SIGHUP, whose default action ends a process.
    if let Err(why) = reload_client::is_static_ingress(pid) {
        eprintln!("error: {why}; not signalling it");
        return ExitCode::from(exit::FAILURE);
    }
    // What the proxy will read: the files it was started on, with its flags and environment.
    let (path, overrides) = match reload_client::started_with(pid) {
        Ok(Cmd::Run(run)) => (config_path(run.config), run.overrides),
        other => {
            let why = other.err().unwrap_or_else(|| "it was not started with `run`".into());
            println!("note: cannot read how process {pid} was started ({why}); checking the default files");
            (config_path(None), Overrides::default())
        }
    };
    // The proxy would refuse an invalid file too; saying so here puts the errors where the
    // operator who ran `systemctl reload` looks, and makes the reload fail.
    let loaded = match load(path.as_ref(), &overrides) {
        Ok(l) => l,
        Err(errors) => {
            print_errors(&errors);
            eprintln!("not reloading: process {pid} keeps running its configuration");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // The first address that answers for this process: the files may have gained or lost the
    // operator's listener since it started.
    let candidates: Vec<_> = loaded.config.admin.status_candidates().into_iter().map(client::local).collect();
    let mut errors = Vec::new();
    let found =
        candidates.iter().find_map(|&a| client::reload_status(a, pid).map(|r| (a, r)).map_err(|e| errors.push(e)).ok());
    let admin = found.as_ref().map_or(candidates[0], |(a, _)| *a);
    let before = found.map(|(_, r)| r).ok_or_else(|| errors.join("; "));
    if let Ok((_, true)) = before {
        eprintln!("error: process {pid} is draining (stopping): a reload does nothing now");
        return ExitCode::from(exit::FAILURE);
    }
    // SAFETY: kill(2) with a positive pid (never a process group) and a valid signal.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        eprintln!("error: cannot signal process {pid}: {}", std::io::Error::last_os_error());
        return ExitCode::from(exit::FAILURE);
    }
    let before = match before {
        Ok((b, _)) => b,
        Err(why) => {
            eprintln!(
                "error: asked process {pid} to reload, but cannot follow it: {why} (the admin addresses apply only at \
                 a restart: if the files change them, restart); its log says how the reload went"
            );
            return ExitCode::from(exit::FAILURE);
        }
    };
    match client::wait_for_reload(admin, pid, before.started, args.wait) {
        Ok(outcome) => {
            for key in &outcome.needs_restart {
                println!("warning: {key} changed, but only a restart applies it; still running the old value");
            }
            for shadowed in &outcome.shadowed {
                println!("warning: {shadowed}");
            }
            match outcome.result.as_str() {
                "applied" => {
                    println!("configuration reloaded by process {pid}");
                    ExitCode::from(exit::OK)
                }
                result => {
                    for e in &outcome.errors {
                        eprintln!("error: {e}");
                    }
                    eprintln!("reload {result}: process {pid} keeps running its previous configuration");
                    ExitCode::from(if result == "invalid" { exit::CONFIG } else { exit::FAILURE })
                }
            }
        }
        Err(why) => {
            eprintln!("error: process {pid} was asked to reload, but {why}; its log says how it went");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// What `reload` learns about the proxy process from /proc.
mod reload_client {
    use super::{Cli, Cmd};
    use clap::Parser;

    /// Ok when process `pid` runs the same program as this one (its `comm`, which systemd and
    /// `ps` show).
    pub fn is_static_ingress(pid: i32) -> Result<(), String> {
        let own =
            std::fs::read_to_string("/proc/self/comm").map_err(|e| format!("cannot read /proc/self/comm: {e}"))?;
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_err(|e| format!("no process {pid} that this user can see ({e})"))?;
        if own.trim_end() == theirs.trim_end() {
            Ok(())
        } else {
            Err(format!("process {pid} is {}, not {}", theirs.trim_end(), own.trim_end()))
        }
    }

    /// The command line process `pid` was started with, parsed as this program parses its
    /// own, with the `STATIC_INGRESS_*` variables of its environment (not this one's: under
    /// systemd this process sees the unit's environment file as it is now, the proxy as it
    /// was at its start). Variables this command sees that differ are reported: only a
    /// restart applies them.
    pub fn started_with(pid: i32) -> Result<Cmd, String> {
        let read = |what: &str| {
            std::fs::read(format!("/proc/{pid}/{what}")).map_err(|e| format!("cannot read /proc/{pid}/{what}: {e}"))
        };
        let (cmdline, environ) = (read("cmdline")?, read("environ")?);
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let theirs: Vec<(String, String)> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                k.starts_with("STATIC_INGRESS_").then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        let ours: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("STATIC_INGRESS_")).collect();
        for (k, v) in &ours {
            match theirs.iter().find(|(t, _)| t == k) {
                Some((_, tv)) if tv == v => {}
                Some(_) => println!(
                    "warning: {k} differs from the value process {pid} started with; only a restart applies it"
                ),
                None => println!(
                    "warning: {k} is set here but not in process {pid}'s environment; only a restart applies it"
                ),
            }
        }
        // SAFETY: `reload` runs before this process starts any thread (no runtime, no
        // logging), so nothing reads the environment concurrently.
        unsafe {
            for (k, _) in &ours {
                std::env::remove_var(k);
            }
            for (k, v) in &theirs {
                std::env::set_var(k, v);
            }
        }
        Cli::try_parse_from(&argv).map(|c| c.command).map_err(|e| {
            format!("its command line does not parse: {}", e.to_string().lines().next().unwrap_or_default())
        })
    }
}

fn claim_eip(args: ClaimArgs) -> ExitCode {
    let path = config_path(args.config);
    let (eip, log) = match Config::load_eip(path.as_ref().map(|(p, o)| (p.as_path(), *o)), &args.overrides.0) {
        Ok(c) => c,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::from(exit::CONFIG);
        }
    };
    logging::init_stderr(&log);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(crate::eip::claim_once(&eip, args.dry_run)).and_then(|(_, claimed)| claimed);
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_environment_file_is_read_as_systemd_reads_it() {
        let text = "# comment\n; also a comment\n\nSTATIC_INGRESS_ADMIN_LISTEN=127.0.0.1:9001\n  \
                    STATIC_INGRESS_LOG_LEVEL = \"debug\" \nSTATIC_INGRESS_LOG_FORMAT='json'\nPATH=/bin\nno equals sign\n";
        assert_eq!(
            env_file_settings(text),
            [
                ("STATIC_INGRESS_ADMIN_LISTEN".to_string(), "127.0.0.1:9001".to_string()),
                ("STATIC_INGRESS_LOG_LEVEL".to_string(), "debug".to_string()),
                ("STATIC_INGRESS_LOG_FORMAT".to_string(), "json".to_string()),
            ]
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_overrides_with_their_origin() {
        let cli = Cli::try_parse_from([
            "static-ingress",
            "run",
            "--backend-address",
            "b.example:443",
            "--proxy-max-connections",
            "5",
        ])
        .unwrap();
        let Cmd::Run(args) = cli.command else { panic!("expected run") };
        let got: Vec<(&str, &str, String)> =
            args.overrides.0.iter().map(|o| (o.key.name, o.value.as_str(), o.origin.to_string())).collect();
        assert_eq!(
            got,
            vec![
                ("proxy.max_connections", "5", "flag --proxy-max-connections".to_string()),
                ("backend.address", "b.example:443", "flag --backend-address".to_string()),
            ]
        );
    }

    #[test]
    fn usage_exit_code_matches_clap() {
        let err = Cli::try_parse_from(["static-ingress", "run", "--no-such-flag"]).unwrap_err();
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
    }
}
