//! Shell completions and man pages, made from the same clap definitions as `--help`, so
//! they never drift from the options the binary takes.

use std::io;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut Cli::command(), "keyhold", &mut io::stdout());
}

/// Writes `keyhold.1` and `keyhold-SUBCOMMAND.1` (nested ones too) into `dir`; returns the
/// files written.
pub fn man_pages(dir: &Path) -> io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    write_pages(Cli::command(), "keyhold", dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    command: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<String>,
) -> io::Result<()> {
    let file = format!("{name}.1");
    let mut page = Vec::new();
    let command = command.display_name(name.to_owned()).bin_name(name.to_owned());
    clap_mangen::Man::new(command.clone()).title(name).render(&mut page)?;
    std::fs::write(dir.join(&file), page)?;
    written.push(file);
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(sub.clone(), &sub_name, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_man_page_is_written_for_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = man_pages(dir.path()).unwrap();
        for page in ["keyhold.1", "keyhold-node.1", "keyhold-ctl.1", "keyhold-ctl-show.1"] {
            assert!(written.iter().any(|w| w == page), "{page} in {written:?}");
        }
        let node = std::fs::read_to_string(dir.path().join("keyhold-node.1")).unwrap();
        assert!(node.contains(".TH keyhold-node 1") && node.contains("\\-\\-config"), "{node}");
    }
}
