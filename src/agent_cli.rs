//! `tandem host agent`: arguments, then `cluster::agent` (placeholder: the lead writes it).

#[derive(clap::Args)]
pub struct AgentArgs {
    /// This host's name in the cluster.
    #[arg(long)]
    pub name: String,
}

pub fn run(_a: &AgentArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not yet")
}
