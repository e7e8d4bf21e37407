use clap::Parser;

fn main() {
    let cli = sluice_operator::cli::Cli::parse();
    match sluice_operator::cli::run(cli) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
