//! Prints the `NymNode` CustomResourceDefinition as YAML. The Helm chart's copy
//! (`helm/nym-operator/crds/nymnodes.yaml`) is exactly this output; a test keeps them equal.

fn main() -> std::process::ExitCode {
    match serde_norway::to_string(&nym_operator::crd::crd()) {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
