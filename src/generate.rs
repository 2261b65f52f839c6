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

/// An option whose values the shell completion asks the binary for, instead of offering
/// file names (bash only).
#[derive(Debug, Clone, Copy)]
pub struct DynamicValues<'a> {
    /// The long option, `--session`.
    pub option: &'a str,
    /// The arguments after the binary's name that print the candidates, one a line, and
    /// nothing on failure: `sessions --ids`.
    pub args: &'a str,
    /// Subcommands whose positional argument takes the same values (`remove-session`).
    pub positional_of: &'a [&'a str],
}

/// Whether the command line asks for a generator.
pub fn requested() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a.to_str().is_some_and(|a| a.starts_with("--generate-")))
}

/// Runs the generator the command line asks for.
pub fn run(req: Request<'_>) -> ExitCode {
    run_with(req, &[])
}

/// [`run`], with options whose bash completion asks the binary for the candidates.
pub fn run_with(req: Request<'_>, dynamic: &[DynamicValues<'_>]) -> ExitCode {
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
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
            let mut script = String::from_utf8_lossy(&script).into_owned();
            if shell == clap_complete::Shell::Bash {
                script = fix_bash(&script, &name, dynamic);
            }
            print!("{script}");
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::from(req.usage_exit),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(req.usage_exit)
        }
    }
}

/// Repairs clap_complete's bash script and adds the dynamic values. For a name with a dash,
/// clap_complete sets `cmd=entrupy__tokenctl__subcmd__token` but matches
/// `entrupy__subcmd__tokenctl__subcmd__token)`, so no subcommand's options were ever
/// offered; the patterns are renamed to what `cmd` holds. An option in `dynamic` completes
/// with what `BIN ARGS` prints instead of file names.
pub fn fix_bash(script: &str, name: &str, dynamic: &[DynamicValues<'_>]) -> String {
    let good = name.replace('-', "__");
    let bad = name.replace('-', "__subcmd__");
    let mut out = if good == bad { script.to_owned() } else { script.replace(&bad, &good) };
    for d in dynamic {
        let ask = format!(
            "COMPREPLY=($(compgen -W \"$(command \"${{COMP_WORDS[0]}}\" {} 2>/dev/null)\" -- \"${{cur}}\"))",
            d.args
        );
        let files = format!("{})\n                    COMPREPLY=($(compgen -f \"${{cur}}\"))", d.option);
        out = out.replace(&files, &format!("{})\n                    {ask}", d.option));
        for sub in d.positional_of {
            out = complete_positional(&out, &format!("{good}__subcmd__{}", sub.replace('-', "__subcmd__")), &ask);
        }
    }
    out
}

/// In the case branch of `cmd_var` (a subcommand), a word that is not an option completes
/// with `ask` (the subcommand's one positional argument) before the options are offered.
fn complete_positional(script: &str, cmd_var: &str, ask: &str) -> String {
    let branch = format!("\n        {cmd_var})\n");
    let test = "            if [[ ${cur} == -* ||";
    let Some(start) = script.find(&branch) else { return script.to_owned() };
    let Some(at) = script[start..].find(test).map(|i| start + i) else { return script.to_owned() };
    let inserted = format!(
        "            if [[ ${{cur}} != -* ]] ; then\n                {ask}\n                return 0\n            fi\n"
    );
    format!("{}{inserted}{}", &script[..at], &script[at..])
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
