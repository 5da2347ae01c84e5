//! `ferry help-json` (hidden): the whole command line as JSON, read from clap's own model of
//! it, plus the `FERRY_*` environment variables the binary reads outside clap. The deploy
//! manifests are checked against this dump (tests/deploy_manifests.rs), so they cannot name a
//! flag, subcommand or variable that the binary does not have.

use clap::{ArgAction, Command};
use serde_json::{json, Value};

/// Environment variables read directly (not through a clap `env`), each from the constant
/// the reading code uses. tests/deploy_manifests.rs checks that every `FERRY_*` name in the
/// sources is either here or a clap `env`.
pub fn direct_env_vars() -> Vec<&'static str> {
    vec![
        ferry_rpc::client::TOKEN_ENV,
        crate::cluster::LOG_ENV,
        ferry_collective::Transport::ENV,
        ferry_collective::nccl::NCCL_LIB_ENV,
        // Test-only fault injection; listed so the manifest check sees every name.
        ferry_dp::worker::PAUSE_BEFORE_STEP_LINE,
        ferry_dp::worker::PAUSE_BEFORE_COMMIT,
        ferry_coordinator::store::SYNC_DELAY_ENV,
        // Test and debugging record of what each worker trained.
        ferry_engine::train::trained_log::TRAINED_SAMPLES_DIR_ENV,
    ]
}

pub fn dump(mut root: Command) -> Value {
    root.build();
    let mut commands = Vec::new();
    let mut env: Vec<String> = direct_env_vars().iter().map(|s| s.to_string()).collect();
    walk(&root, &mut Vec::new(), &mut commands, &mut env);
    env.sort();
    env.dedup();
    json!({
        "name": root.get_name(),
        "version": root.get_version(),
        "commands": commands,
        "env": env,
    })
}

/// One entry per command, the root included (path `[]`), depth first.
fn walk(cmd: &Command, path: &mut Vec<String>, out: &mut Vec<Value>, env: &mut Vec<String>) {
    let mut flags = Vec::new();
    let mut positionals = Vec::new();
    for arg in cmd.get_arguments() {
        let arg_env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        if let Some(e) = &arg_env {
            env.push(e.clone());
        }
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let takes_value = arg.get_action().takes_values();
        // Several occurrences (`--set a=1 --set b=2`) vs several words in one (`--input a b`).
        let repeatable = matches!(arg.get_action(), ArgAction::Append | ArgAction::Count);
        let multiple_values = arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        if arg.is_positional() {
            positionals.push(json!({
                "name": arg.get_id().as_str(),
                "required": arg.is_required_set(),
                "repeatable": repeatable || multiple_values,
            }));
            continue;
        }
        flags.push(json!({
            "id": arg.get_id().as_str(),
            "long": arg.get_long(),
            "aliases": arg.get_all_aliases().unwrap_or_default(),
            "short": arg.get_short().map(String::from),
            "takes_value": takes_value,
            "repeatable": repeatable,
            "multiple_values": multiple_values,
            "required": arg.is_required_set(),
            "env": arg_env,
            "defaults": defaults,
            // Empty when any value is accepted.
            "possible_values": if takes_value { possible } else { Vec::new() },
        }));
    }
    out.push(json!({
        "path": path.clone(),
        "hidden": cmd.is_hide_set(),
        "has_subcommands": cmd.has_subcommands(),
        "flags": flags,
        "positionals": positionals,
    }));
    for sub in cmd.get_subcommands() {
        path.push(sub.get_name().to_string());
        walk(sub, path, out, env);
        path.pop();
    }
}
