//! Packaging helpers behind the binaries' hidden `--generate-man DIR` and
//! `--generate-completions SHELL` flags: man pages (clap_mangen) and shell completions
//! (clap_complete) from the same clap definitions the binaries parse, so they cannot drift.
//! Used by `scripts/package-deb`; nothing here runs in the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

/// The hidden flags, parsed apart from a binary's own CLI so they stay out of its help, man
/// page and completions.
#[derive(Debug, Parser)]
struct Flags {
    /// Write the man pages into DIR.
    #[arg(long, value_name = "DIR", exclusive = true)]
    generate_man: Option<PathBuf>,
    /// Print the completion script for SHELL.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    generate_completions: Option<clap_complete::Shell>,
}

/// What a binary asks of the generator.
#[derive(Debug)]
pub struct Request<'a> {
    /// The binary's clap command.
    pub command: clap::Command,
    /// Sections of the main man page that clap does not know (roff).
    pub man_extra: &'a str,
    /// Also write one page per subcommand (`entrupy-tokenctl-status.1`, ...).
    pub subcommand_pages: bool,
    /// Exit code of a usage error (each binary keeps its own).
    pub usage_exit: u8,
}

/// Whether the command line asks for a generator.
pub fn requested() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a.to_str().is_some_and(|a| a.starts_with("--generate-")))
}

/// Runs the generator the command line asks for.
pub fn run(req: Request<'_>) -> ExitCode {
    let name = req.command.get_name().to_owned();
    let flags = clap::Command::new("generate").bin_name(name.clone());
    let parsed = <Flags as clap::FromArgMatches>::from_arg_matches(&match <Flags as clap::Args>::augment_args(flags)
        .try_get_matches()
    {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(req.usage_exit);
        }
    });
    match parsed {
        Ok(Flags { generate_man: Some(dir), .. }) => write_man(&req, &name, &dir),
        Ok(Flags { generate_completions: Some(shell), .. }) => {
            let mut cmd = req.command;
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::from(req.usage_exit),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(req.usage_exit)
        }
    }
}

fn write_man(req: &Request<'_>, name: &str, dir: &Path) -> ExitCode {
    let cmd = req.command.clone().disable_help_subcommand(true);
    let main = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(main.get_filename());
    let written = (|| {
        if req.subcommand_pages {
            clap_mangen::generate_to(cmd, dir)?;
        }
        let mut page = Vec::new();
        main.render(&mut page)?;
        page.extend_from_slice(req.man_extra.as_bytes());
        std::fs::write(&path, page)
    })();
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write the man pages into {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}
