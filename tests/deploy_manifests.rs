//! The deploy manifests (deploy/: Kubernetes with its CPU overlay, compose, Slurm, the
//! Dockerfile) and the docs' and scripts' command lines, checked against the binary's own
//! description of its command line (`ferry help-json`): every subcommand, flag and FERRY_*
//! variable they use must exist, so they cannot drift from the binary. Also the things the
//! manifests must agree on with each other and with the repository: ports, names, the job
//! specs, the Secret, the image, and the wheel's library layout the Dockerfile copies.

#[path = "support/manifests.rs"]
mod manifests;
mod support;

use manifests::*;
use serde_yaml::Value as Yaml;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cli() -> &'static CliSpec {
    static SPEC: OnceLock<CliSpec> = OnceLock::new();
    SPEC.get_or_init(|| CliSpec::from_binary(Path::new(env!("CARGO_BIN_EXE_ferry"))))
}

fn deploy() -> PathBuf {
    support::root().join("deploy")
}

fn rel(p: &Path) -> String {
    p.strip_prefix(support::root())
        .unwrap_or(p)
        .display()
        .to_string()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The ferry command lines and FERRY_* names of one file under deploy/, by its type. Panics
/// on a file type it does not know, so a new manifest cannot go unchecked.
fn extract(path: &Path) -> (Vec<Invocation>, Vec<(String, String)>) {
    let origin = rel(path);
    let text = std::fs::read_to_string(path).unwrap();
    let mut env = ferry_env_names(&origin, &text);
    let name = path.file_name().unwrap().to_str().unwrap();
    let invocations = match path.extension().and_then(|e| e.to_str()) {
        _ if name == "Dockerfile" => dockerfile_invocations(&origin, &text),
        Some("sbatch") => shell_invocations(&origin, &text),
        // The repository's scripts and docs may name variables that only scripts read
        // (FERRY_DATA_DIR, FERRY_MAIN_STEPS); their ferry commands are checked.
        Some("sh") => {
            env.clear();
            shell_invocations(&origin, &text)
        }
        Some("md") => {
            env.clear();
            shell_invocations(&origin, &markdown_shell_blocks(&text))
        }
        Some("yaml") | Some("yml") => {
            let docs = yaml_documents(path);
            let mut inv = Vec::new();
            for doc in &docs {
                if doc.get("services").is_some() {
                    for (_, i, names) in compose_services(&origin, doc) {
                        inv.push(i);
                        env.extend(names.into_iter().map(|n| (origin.clone(), n)));
                    }
                }
                for c in containers(doc) {
                    inv.extend(container_invocations(&origin, c));
                    env.extend(container_env(c).into_iter().map(|n| (origin.clone(), n)));
                }
            }
            inv
        }
        _ => panic!("{origin}: a deploy file of a type this test does not check"),
    };
    // Structured env names are checked only when they are ferry's (FERRY_*).
    env.retain(|(_, n)| n.starts_with("FERRY_"));
    (invocations, env)
}

/// ENTRYPOINT + CMD of the final stage, and every exec-form RUN of the binary.
fn dockerfile_invocations(origin: &str, text: &str) -> Vec<Invocation> {
    let ins = dockerfile_instructions(text);
    let last_stage = ins.last().map(|i| i.stage.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut entrypoint = None;
    let mut cmd = None;
    for i in &ins {
        let words = exec_form(&i.text);
        match (i.keyword.as_str(), words) {
            ("ENTRYPOINT", Some(w)) if i.stage == last_stage => entrypoint = Some((i.line, w)),
            ("CMD", Some(w)) if i.stage == last_stage => cmd = Some((i.line, w)),
            ("ENTRYPOINT" | "CMD", None) => panic!(
                "{origin}:{}: {} in shell form; use the exec form so signals reach ferry",
                i.line, i.keyword
            ),
            ("RUN", Some(w)) if w.first().is_some_and(|b| is_ferry_word(b)) => {
                out.push(Invocation {
                    origin: format!("{origin}:{}", i.line),
                    argv: w[1..].to_vec(),
                })
            }
            _ => {}
        }
    }
    let (line, entry) = entrypoint.unwrap_or_else(|| panic!("{origin}: no ENTRYPOINT"));
    assert!(
        entry.len() == 1 && is_ferry_word(&entry[0]),
        "{origin}:{line}: the entrypoint should be the ferry binary alone, not {entry:?}"
    );
    out.push(Invocation {
        origin: format!("{origin}:{line}: ENTRYPOINT + CMD"),
        argv: cmd.map(|c| c.1).unwrap_or_default(),
    });
    out
}

#[test]
fn every_ferry_command_and_variable_in_deploy_docs_and_scripts_exists_in_the_binary() {
    let mut invocations = Vec::new();
    let mut env = Vec::new();
    let mut counts = Vec::new();
    let mut files = files_under(&deploy());
    files.push(support::root().join("README.md"));
    // The benchmark commands are copied by readers too.
    files.push(support::root().join("BENCHMARKS.md"));
    files.extend(
        std::fs::read_dir(support::root().join("scripts"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sh")),
    );
    for f in &files {
        let (i, e) = extract(f);
        counts.push((rel(f), i.len()));
        invocations.extend(i);
        env.extend(e);
    }
    let problems = cli().problems(&invocations, &env);
    assert!(
        problems.is_empty(),
        "manifests that do not match the binary:\n  {}",
        problems.join("\n  ")
    );
    // The extraction itself must find what is there: a checker that reads nothing passes
    // everything. These are the commands each file runs.
    let at_least = [
        ("deploy/Dockerfile", 2),         // RUN ferry --version, ENTRYPOINT + CMD
        ("deploy/compose.yaml", 3),       // coordinator, two workers
        ("deploy/slurm/ferry.sbatch", 4), // coordinator, status (x2), worker
        ("deploy/k8s/coordinator.yaml", 1),
        ("deploy/k8s/worker.yaml", 1),
        ("deploy/k8s/prepare-job.yaml", 1),
        ("deploy/k8s/overlays/cpu/worker-cpu.yaml", 1),
        ("README.md", 10),
        ("scripts/main-job.sh", 3),
    ];
    for (file, n) in at_least {
        let found = counts
            .iter()
            .find(|(f, _)| f == file)
            .unwrap_or_else(|| panic!("{file} was not checked"))
            .1;
        assert!(
            found >= n,
            "{file}: found {found} ferry command lines, expected {n}+: {counts:?}"
        );
    }
    eprintln!(
        "checked {} command lines and {} FERRY_* names in {} files",
        invocations.len(),
        env.len(),
        files.len()
    );
}

#[test]
fn the_checker_rejects_flags_subcommands_and_variables_the_binary_lacks() {
    let spec = cli();
    let argv = |s: &str| shlex::split(s).unwrap();
    // What the manifests run passes...
    for ok in [
        "worker --coordinator ferry-coordinator:29400 --advertise $(POD_IP) --metrics-listen 0.0.0.0:29500 --device cuda",
        "coordinator --job /etc/ferry/job.toml --state /var/lib/ferry --http=0.0.0.0:29401",
        "prepare --input a b c --output out",
        "launch --local --workers 2 job.toml",
        "bench allreduce --rank 0 --world 2 --peers a:1,b:2 --transport tcp",
        "--help",
    ] {
        assert!(spec.check_invocation(&argv(ok)).is_ok(), "{ok}: {:?}", spec.check_invocation(&argv(ok)));
    }
    // ...and each kind of drift is caught, with a message that says what.
    for (bad, says) in [
        ("worker --coordinater x:1", "no flag --coordinater"),
        ("worker --metrics-port 29500", "no flag --metrics-port"),
        ("wroker --coordinator x:1", "no subcommand \"wroker\""),
        ("worker --coordinator", "--coordinator needs a value"),
        ("launch --local=yes job.toml", "--local takes no value"),
        ("launch --local", "needs 1 positional"),
        ("coordinator --job j.toml", "--state is required"),
        (
            "bench allreduce --rank 0 --world 2 --peers a:1 --transport udp",
            "not one of auto, tcp, shm",
        ),
        ("status extra words", "unexpected argument"),
        ("bench", "needs a subcommand"),
    ] {
        let err = spec.check_invocation(&argv(bad)).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
    assert!(spec.check_env("FERRY_JOB_TOKEN").is_ok());
    assert!(spec.check_env("FERRY_JOB_TOKN").is_err());

    // The same path as the real manifests: a Kubernetes workload, a compose service and a
    // batch script, each with one made-up flag or variable, are all reported.
    let k8s = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: w}
spec:
  template:
    spec:
      containers:
        - name: worker
          image: ferry
          args: [worker, --coordinator, c:29400, --gpus-per-worker, "1"]
          env: [{name: FERRY_WORKER_TOKEN, value: x}]
"#;
    let doc = &yaml_documents_of(k8s, "k8s")[0];
    let c = containers(doc)[0];
    let problems = spec.problems(
        &container_invocations("k8s", c),
        &container_env(c)
            .into_iter()
            .map(|n| ("k8s".to_string(), n))
            .collect::<Vec<_>>(),
    );
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("--gpus-per-worker"), "{problems:?}");
    assert!(problems[1].contains("FERRY_WORKER_TOKEN"), "{problems:?}");

    let compose = "services:\n  w:\n    image: ferry\n    command: [worker, --coordinator, 'c:29400', --threds, '2']\n";
    let services = compose_services("compose", &yaml_documents_of(compose, "compose")[0]);
    let invocations: Vec<Invocation> = services.into_iter().map(|s| s.1).collect();
    let problems = spec.problems(&invocations, &[]);
    assert!(
        problems.len() == 1 && problems[0].contains("--threds"),
        "{problems:?}"
    );

    let script = "#!/bin/bash\n#SBATCH --nodes=2\nsrun bash -c 'exec \"$ferry\" worker \\\n  --coordinator \"$head:29400\" --devices cuda'\n\"$ferry\" stauts\n";
    let problems = spec.problems(
        &shell_invocations("sbatch", script),
        &ferry_env_names("sbatch", "export FERRY_TOKEN=x"),
    );
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn every_ferry_variable_the_sources_read_is_in_the_dump() {
    // The dump lists clap's `env`s and the variables read directly (src/cli_spec.rs); a new
    // `std::env::var("FERRY_...")` that is not listed would make the manifest check blind to it.
    let root = support::root();
    let mut found = BTreeSet::new();
    // The binary's sources and every workspace crate's, read from the workspace's `members`
    // so that a new crate cannot be missed.
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = ["))
        .expect("Cargo.toml: a one-line `members = [...]`");
    let mut dirs = vec!["src".to_string()];
    dirs.extend(
        members
            .trim_end_matches(']')
            .split(',')
            .map(|m| format!("{}/src", m.trim().trim_matches('"'))),
    );
    assert!(dirs.len() > 5, "workspace members not found: {dirs:?}");
    for dir in &dirs {
        assert!(root.join(dir).is_dir(), "{dir}: no such directory");
        for f in files_under(&root.join(dir)) {
            let name = f.file_name().unwrap().to_str().unwrap();
            // Unit-test helpers only (FERRY_RING_TEST_CHILD and the like).
            if f.extension().is_none_or(|e| e != "rs") || name == "tests.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            for (_, n) in ferry_env_names(&rel(&f), &text) {
                found.insert(n);
            }
        }
    }
    assert!(
        found.contains("FERRY_JOB_TOKEN") && found.contains("FERRY_NCCL_LIB"),
        "{found:?}"
    );
    let missing: Vec<&String> = found.iter().filter(|n| !cli().env.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "read by the sources but not in `ferry help-json`: {missing:?}"
    );
}

// ----- Kubernetes -----

fn by_kind<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| kind_name(d) == (kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The value after `flag` in argv (`--flag v` or `--flag=v`).
fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_string)
        }
    })
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{addr}: no port"))
}

fn job_of(configmap: &Yaml, origin: &str) -> ferry_spec::job::JobSpec {
    let toml = str_at(configmap, &["data", "job.toml"]).expect("data.job.toml");
    ferry_spec::job::JobSpec::from_toml(toml, origin).unwrap_or_else(|e| panic!("{e}"))
}

fn probe(c: &Yaml, which: &str) -> (String, u64) {
    let p = get(c, &[which, "httpGet"]).unwrap_or_else(|| panic!("no {which}.httpGet"));
    (
        str_at(p, &["path"]).unwrap().to_string(),
        get(p, &["port"])
            .and_then(|p| p.as_u64())
            .expect("numeric probe port"),
    )
}

/// The checks both variants must pass; returns the worker container's argv.
fn check_kubernetes_build(docs: &[Yaml], variant: &str) -> Vec<String> {
    let coordinator = by_kind(docs, "Deployment", "ferry-coordinator");
    let workers = by_kind(docs, "StatefulSet", "ferry-worker");
    let service = by_kind(docs, "Service", "ferry-coordinator");
    let job = job_of(
        by_kind(docs, "ConfigMap", "ferry-job"),
        &format!("{variant}: ConfigMap ferry-job"),
    );
    let secret = &yaml_documents(&deploy().join("k8s/secret.yaml"))[0];
    let secret_name = str_at(secret, &["metadata", "name"]).unwrap();
    let secret_keys: Vec<String> = get(secret, &["stringData"])
        .and_then(|d| d.as_mapping())
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();

    // The coordinator listens where its Service and probes point.
    let cc = containers(coordinator)[0];
    let c_argv = container_invocations(variant, cc).remove(0).argv;
    assert_eq!(c_argv[0], "coordinator");
    let grpc = port_of(&flag_value(&c_argv, "--listen").expect("--listen"));
    let http = port_of(&flag_value(&c_argv, "--http").expect("--http"));
    let svc_ports: Vec<u64> = get(service, &["spec", "ports"])
        .and_then(|p| p.as_sequence())
        .unwrap()
        .iter()
        .map(|p| get(p, &["targetPort"]).and_then(|t| t.as_u64()).unwrap())
        .collect();
    assert!(
        svc_ports.contains(&grpc) && svc_ports.contains(&http),
        "{svc_ports:?} vs {grpc}, {http}"
    );
    assert_eq!(probe(cc, "livenessProbe"), ("/healthz".into(), http));
    assert_eq!(
        get(coordinator, &["spec", "replicas"]).and_then(|r| r.as_u64()),
        Some(1)
    );
    assert_eq!(
        str_at(coordinator, &["spec", "strategy", "type"]),
        Some("Recreate"),
        "never two coordinators on one state"
    );

    // Workers reach the coordinator through its Service; probes on the metrics port.
    let wc = containers(workers)[0];
    let w_argv = container_invocations(variant, wc).remove(0).argv;
    assert_eq!(w_argv[0], "worker");
    let svc_name = str_at(service, &["metadata", "name"]).unwrap();
    assert_eq!(
        flag_value(&w_argv, "--coordinator"),
        Some(format!("{svc_name}:{grpc}"))
    );
    let metrics = port_of(&flag_value(&w_argv, "--metrics-listen").expect("--metrics-listen"));
    assert_eq!(probe(wc, "readinessProbe"), ("/readyz".into(), metrics));
    assert_eq!(probe(wc, "livenessProbe"), ("/healthz".into(), metrics));
    assert_eq!(
        str_at(workers, &["spec", "podManagementPolicy"]),
        Some("Parallel"),
        "scale-ups must not wait pod by pod"
    );
    // The advertised address is the pod IP from the downward API.
    let advertise = flag_value(&w_argv, "--advertise").expect("--advertise");
    let var = advertise.trim_start_matches("$(").trim_end_matches(')');
    let env = wc.get("env").and_then(|e| e.as_sequence()).unwrap();
    assert!(
        env.iter().any(|e| str_at(e, &["name"]) == Some(var)
            && str_at(e, &["valueFrom", "fieldRef", "fieldPath"]) == Some("status.podIP")),
        "--advertise {advertise}: not the pod IP"
    );

    // The replicas fit the job, so the job absorbs them and `kubectl scale` within max_workers.
    let replicas = get(workers, &["spec", "replicas"])
        .and_then(|r| r.as_u64())
        .unwrap();
    assert!(
        u64::from(job.cluster.min_workers) <= replicas && replicas <= u64::from(job.max_workers()),
        "{variant}: {replicas} replicas outside {}..={}",
        job.cluster.min_workers,
        job.max_workers()
    );

    // Both workloads read the token from the Secret secret.yaml describes, run the same image,
    // and run as the image's non-root user.
    for (doc, c) in [(coordinator, cc), (workers, wc)] {
        let token = c
            .get("env")
            .and_then(|e| e.as_sequence())
            .unwrap()
            .iter()
            .find(|e| str_at(e, &["name"]) == Some(ferry_rpc::client::TOKEN_ENV))
            .expect("FERRY_JOB_TOKEN is set");
        assert_eq!(
            str_at(token, &["valueFrom", "secretKeyRef", "name"]),
            Some(secret_name)
        );
        let key = str_at(token, &["valueFrom", "secretKeyRef", "key"]).unwrap();
        assert!(
            secret_keys.iter().any(|k| k == key),
            "secret key {key} not in secret.yaml"
        );
        assert_eq!(str_at(c, &["image"]), Some("ferry:0.1.0"));
        let pod = pod_spec(doc).unwrap();
        assert_eq!(
            get(pod, &["securityContext", "runAsNonRoot"]).and_then(|v| v.as_bool()),
            Some(true)
        );
        assert_eq!(
            get(pod, &["securityContext", "runAsUser"]).and_then(|v| v.as_u64()),
            Some(10001)
        );
    }
    // Every volume a container mounts is declared; every PVC it claims exists.
    for doc in [coordinator, workers] {
        let pod = pod_spec(doc).unwrap();
        let volumes: Vec<&Yaml> = pod
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .unwrap()
            .iter()
            .collect();
        for c in containers(doc) {
            for m in c
                .get("volumeMounts")
                .and_then(|v| v.as_sequence())
                .into_iter()
                .flatten()
            {
                let name = str_at(m, &["name"]).unwrap();
                assert!(
                    volumes.iter().any(|v| str_at(v, &["name"]) == Some(name)),
                    "volume {name}"
                );
            }
        }
        for v in volumes {
            if let Some(claim) = str_at(v, &["persistentVolumeClaim", "claimName"]) {
                by_kind(docs, "PersistentVolumeClaim", claim);
            }
            if let Some(cm) = str_at(v, &["configMap", "name"]) {
                by_kind(docs, "ConfigMap", cm);
            }
        }
    }
    // The job's data and run directory are on the shared volume the workers mount.
    let shared = wc
        .get("volumeMounts")
        .and_then(|v| v.as_sequence())
        .unwrap()
        .iter()
        .find(|m| str_at(m, &["name"]) == Some("shared"))
        .and_then(|m| str_at(m, &["mountPath"]))
        .expect("workers mount the shared volume");
    assert!(
        job.data.shards.starts_with(shared),
        "{}",
        job.data.shards.display()
    );
    assert!(
        job.job.run_dir.starts_with(shared),
        "{}",
        job.job.run_dir.display()
    );
    w_argv
}

#[test]
fn kubernetes_base_and_cpu_overlay_build_into_consistent_gpu_and_cpu_deployments() {
    let base_dir = deploy().join("k8s");
    let (gpu, gpu_files) = kustomize(&base_dir).unwrap_or_else(|e| panic!("{e}"));
    let (cpu, cpu_files) =
        kustomize(&base_dir.join("overlays/cpu")).unwrap_or_else(|e| panic!("{e}"));

    let gpu_argv = check_kubernetes_build(&gpu, "deploy/k8s");
    let cpu_argv = check_kubernetes_build(&cpu, "deploy/k8s/overlays/cpu");
    let limits = |docs: &[Yaml]| -> Yaml {
        get(
            containers(by_kind(docs, "StatefulSet", "ferry-worker"))[0],
            &["resources", "limits"],
        )
        .cloned()
        .unwrap_or(Yaml::Null)
    };
    // GPU: one GPU per worker pod, the CUDA device. CPU: no GPU asked for, the CPU device.
    assert_eq!(
        limits(&gpu).get("nvidia.com/gpu").and_then(|g| g.as_u64()),
        Some(1)
    );
    assert_eq!(flag_value(&gpu_argv, "--device").as_deref(), Some("cuda"));
    assert!(
        limits(&cpu).get("nvidia.com/gpu").is_none(),
        "{:?}",
        limits(&cpu)
    );
    assert_eq!(flag_value(&cpu_argv, "--device").as_deref(), Some("cpu"));
    let cpu_job = job_of(by_kind(&cpu, "ConfigMap", "ferry-job"), "cpu overlay");
    assert_eq!(cpu_job.cluster.backend, ferry_spec::job::Backend::Ring);

    // Every YAML file under deploy/k8s is either built by a kustomization or applied by hand
    // as the README says; the hand-applied ones use the image the kustomization names.
    let built: BTreeSet<PathBuf> = gpu_files.into_iter().chain(cpu_files).collect();
    let by_hand = ["secret.yaml", "prepare-job.yaml"].map(|f| base_dir.join(f));
    for f in files_under(&base_dir) {
        assert!(
            built.contains(&f) || by_hand.contains(&f),
            "{}: neither built nor documented",
            rel(&f)
        );
    }
    let prepare = &yaml_documents(&by_hand[1])[0];
    assert_eq!(
        str_at(containers(prepare)[0], &["image"]),
        Some("ferry:0.1.0")
    );
    let secret = &yaml_documents(&by_hand[0])[0];
    assert_eq!(
        str_at(secret, &["stringData", "token"]),
        Some(""),
        "no token is shipped"
    );
}

// ----- compose -----

#[test]
fn compose_runs_one_coordinator_and_two_cpu_workers_of_a_real_job() {
    let path = deploy().join("compose.yaml");
    let doc = &yaml_documents(&path)[0];
    let services = compose_services("compose", doc);
    let role = |argv: &[String]| argv.first().cloned().unwrap_or_default();
    let coordinators: Vec<_> = services
        .iter()
        .filter(|s| role(&s.1.argv) == "coordinator")
        .collect();
    let workers: Vec<_> = services
        .iter()
        .filter(|s| role(&s.1.argv) == "worker")
        .collect();
    assert_eq!(
        (coordinators.len(), workers.len(), services.len()),
        (1, 2, 3)
    );
    let (coord_name, coord, _) = coordinators[0];
    let grpc = port_of(&flag_value(&coord.argv, "--listen").unwrap());
    // The job file it names is mounted from the repository and is a valid job for 2 workers.
    let job_arg = flag_value(&coord.argv, "--job").unwrap();
    let svc = get(doc, &["services", coord_name.as_str()]).unwrap();
    let mounts = strings(svc.get("volumes"));
    let workdir = "/ferry"; // the image's WORKDIR
    let host_job = mounts
        .iter()
        .find_map(|m| {
            let mut parts = m.split(':');
            let (host, container) = (parts.next()?, parts.next()?);
            let inside = Path::new(workdir).join(&job_arg);
            inside
                .strip_prefix(container)
                .ok()
                .map(|rest| deploy().join(host).join(rest))
        })
        .unwrap_or_else(|| panic!("--job {job_arg} is not on a mounted volume: {mounts:?}"));
    let job = ferry_spec::job::JobSpec::from_file(&host_job).unwrap_or_else(|e| panic!("{e}"));
    assert!(job.max_workers() >= 2 && job.cluster.min_workers <= 2);
    for (name, w, _) in &workers {
        assert_eq!(
            flag_value(&w.argv, "--coordinator"),
            Some(format!("{coord_name}:{grpc}"))
        );
        assert_eq!(flag_value(&w.argv, "--device").as_deref(), Some("cpu"));
        let svc = get(doc, &["services", name.as_str()]).unwrap();
        assert_eq!(
            flag_value(&w.argv, "--advertise").as_deref(),
            str_at(svc, &["hostname"]),
            "{name}: peers must reach the address it advertises"
        );
        // Rank 0 writes checkpoints into the run directory the coordinator's volume holds.
        assert!(
            strings(svc.get("volumes"))
                .iter()
                .any(|v| v.starts_with("runs:")),
            "{name}"
        );
    }
}

// ----- Dockerfile -----

fn readelf_dynamic(path: &Path) -> String {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success(), "readelf -d {}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The directories of a RPATH/RUNPATH line of `readelf -d`.
fn rpaths(dynamic: &str) -> Vec<String> {
    dynamic
        .lines()
        .filter(|l| l.contains("(RPATH)") || l.contains("(RUNPATH)"))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_string()))
        .flat_map(|p| p.split(':').map(str::to_string).collect::<Vec<_>>())
        .collect()
}

#[test]
fn dockerfile_copies_what_exists_and_lays_out_the_wheel_libraries_where_the_rpaths_point() {
    let path = deploy().join("Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap();
    let ins = dockerfile_instructions(&text);
    let stages: Vec<String> = ins
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.stage.clone())
        .collect();
    assert_eq!(
        stages,
        ["builder", "runtime"],
        "multi-stage: builder, then runtime"
    );

    // Every COPY from the build context names a file of the repository, and .dockerignore
    // keeps none of them out.
    let ignored = std::fs::read_to_string(support::root().join(".dockerignore")).unwrap();
    for i in ins
        .iter()
        .filter(|i| i.keyword == "COPY" && !i.text.starts_with("--from"))
    {
        let words: Vec<&str> = i.text.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            if *src != "." {
                assert!(
                    support::root().join(src).exists(),
                    "Dockerfile:{}: {src} does not exist",
                    i.line
                );
            }
            assert!(
                !ignored.lines().any(|l| l.trim() == *src),
                "{src} is in .dockerignore"
            );
        }
    }
    // The wheel is the pinned one, installed where LIBTORCH points the build (so the binary's
    // RPATH is <site>/torch/lib), and the runtime stage has the staged libraries at that path.
    let requirements =
        std::fs::read_to_string(support::root().join("scripts/requirements.txt")).unwrap();
    assert!(
        requirements.lines().any(|l| l.starts_with("torch==")),
        "a pinned torch"
    );
    let builder_text: String = ins
        .iter()
        .filter(|i| i.stage == "builder")
        .map(|i| i.text.clone() + "\n")
        .collect();
    let site = builder_text
        .split_whitespace()
        .skip_while(|w| *w != "--target")
        .nth(1)
        .expect("pip install --target DIR")
        .to_string();
    let libtorch = builder_text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("LIBTORCH="))
        .expect("ENV LIBTORCH=");
    assert_eq!(
        libtorch,
        format!("{site}/torch"),
        "the build's libtorch is the installed wheel"
    );
    assert!(
        builder_text.contains("cp -a $site/torch/lib /stage$site/torch/lib"),
        "torch/lib is staged at its own path"
    );
    assert!(
        builder_text.contains("for lib in $site/nvidia/*/lib"),
        "every nvidia/*/lib is staged"
    );
    assert!(builder_text.contains(&format!("site={site}")));
    let runtime_copy = ins
        .iter()
        .find(|i| {
            i.stage == "runtime" && i.keyword == "COPY" && i.text.starts_with("--from=builder")
        })
        .expect("the runtime copies from the builder");
    let words: Vec<&str> = runtime_copy.text.split_whitespace().collect();
    let (from, to) = (words[1], words[2]);
    assert_eq!(
        from.strip_prefix("/stage"),
        Some(to),
        "staged files land at their build paths"
    );
    assert!(site.starts_with(to), "{site} is inside {to}");
    let user = ins.iter().rfind(|i| i.keyword == "USER").expect("USER");
    assert_eq!(user.stage, "runtime");
    assert!(
        !user.text.starts_with('0') && user.text != "root",
        "runs as non-root: {}",
        user.text
    );

    // The same mechanism, as built here: the binary's RPATH is LIBTORCH's lib directory...
    let binary = Path::new(env!("CARGO_BIN_EXE_ferry"));
    let libtorch_lib = std::fs::canonicalize(support::root().join(".venv/libtorch/lib")).unwrap();
    let ours: Vec<PathBuf> = rpaths(&readelf_dynamic(binary))
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    assert!(
        ours.contains(&libtorch_lib),
        "the binary's RPATH {ours:?} does not name {}",
        libtorch_lib.display()
    );
    // ...and libtorch's own RPATH entries, relative to torch/lib, are all nvidia/<package>/lib
    // directories of the wheel, which the Dockerfile's nvidia/*/lib loop stages. NCCL is
    // among them, where ferry's NCCL loader expects it.
    let site_packages = libtorch_lib.parent().unwrap().parent().unwrap();
    let cuda = libtorch_lib.join("libtorch_cuda.so");
    if cuda.exists() {
        let entries = rpaths(&readelf_dynamic(&cuda));
        assert!(!entries.is_empty());
        for e in &entries {
            if e == "$ORIGIN" {
                continue;
            }
            let rest = e
                .strip_prefix("$ORIGIN/../../")
                .unwrap_or_else(|| panic!("unexpected RPATH entry {e}"));
            let dir = site_packages.join(rest);
            assert!(
                rest.starts_with("nvidia/") && rest.ends_with("/lib") && dir.is_dir(),
                "{e} -> {}",
                dir.display()
            );
        }
        assert!(site_packages.join("nvidia/nccl/lib/libnccl.so.2").exists());
    } else {
        eprintln!("this wheel has no CUDA libraries; the GPU layout was not checked");
    }
}

// ----- TLS -----

/// The certificate step every shipped path uses (compose and Slurm run it, Kubernetes
/// documents it), and the files it writes, which are also the keys of the Kubernetes Secret.
const CERT_STEP: &str = "deploy/make-certs.sh";
const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "tls.crt";
const KEY_FILE: &str = "tls.key";
const CA_ENV: &str = "FERRY_TLS_CA";

/// The server name a client verifies: --tls-domain, else the host of --coordinator.
fn server_name(argv: &[String]) -> String {
    flag_value(argv, "--tls-domain").unwrap_or_else(|| {
        let address = flag_value(argv, "--coordinator").unwrap_or_default();
        let host = address
            .rsplit_once(':')
            .map_or(address.as_str(), |(h, _)| h);
        host.to_string()
    })
}

/// What one ferry command line lacks for TLS: a coordinator without its certificate and key,
/// a client (worker, status, scale, stop) without the CA that signed it, as a flag or as
/// FERRY_TLS_CA among `env` (the variables its container, service or script sets).
fn tls_gaps(inv: &Invocation, env: &[String]) -> Vec<String> {
    let argv = &inv.argv;
    let mut gaps = Vec::new();
    match argv.first().map(String::as_str) {
        Some("coordinator") => {
            for flag in ["--tls-cert", "--tls-key"] {
                if flag_value(argv, flag).is_none() {
                    gaps.push(format!(
                        "{}: the coordinator serves gRPC without {flag}, in plain text",
                        inv.origin
                    ));
                }
            }
        }
        Some("worker" | "status" | "scale" | "stop") => {
            if flag_value(argv, "--tls-ca").is_none() && !env.iter().any(|e| e == CA_ENV) {
                gaps.push(format!(
                    "{}: `ferry {}` has no --tls-ca (nor {CA_ENV}): its token would cross the \
                     network in plain text",
                    inv.origin, argv[0]
                ));
            }
            if flag_value(argv, "--coordinator").is_some_and(|a| a.starts_with("http://")) {
                gaps.push(format!("{}: an http:// coordinator address", inv.origin));
            }
        }
        _ => {}
    }
    gaps
}

/// Where a path inside a pod comes from: (volume name, key of the Secret it projects).
fn pod_file_source<'a>(pod: &'a Yaml, c: &Yaml, path: &str) -> Option<(&'a str, String)> {
    let (dir, file) = path.rsplit_once('/')?;
    let mount = c
        .get("volumeMounts")
        .and_then(|m| m.as_sequence())?
        .iter()
        .find(|m| str_at(m, &["mountPath"]).map(|p| p.trim_end_matches('/')) == Some(dir))?;
    let name = str_at(mount, &["name"])?;
    let volume = pod
        .get("volumes")
        .and_then(|v| v.as_sequence())?
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(name))?;
    let secret = str_at(volume, &["secret", "secretName"])?;
    let key = match get(volume, &["secret", "items"]).and_then(|i| i.as_sequence()) {
        None => file.to_string(),
        Some(items) => str_at(
            items.iter().find(|i| str_at(i, &["path"]) == Some(file))?,
            &["key"],
        )?
        .to_string(),
    };
    Some((secret, key))
}

fn kubernetes_tls_gaps(
    docs: &[Yaml],
    variant: &str,
    step_names: &[String],
    secret: &str,
) -> Vec<String> {
    let mut gaps = Vec::new();
    let coordinator = by_kind(docs, "Deployment", "ferry-coordinator");
    let workers = by_kind(docs, "StatefulSet", "ferry-worker");
    for (doc, role) in [(coordinator, "coordinator"), (workers, "worker")] {
        let c = containers(doc)[0];
        let inv = container_invocations(variant, c).remove(0);
        let env = container_env(c);
        gaps.extend(tls_gaps(&inv, &env));
        let pod = pod_spec(doc).unwrap();
        let files: Vec<(&str, &str)> = if role == "coordinator" {
            vec![("--tls-cert", CERT_FILE), ("--tls-key", KEY_FILE)]
        } else {
            vec![("--tls-ca", CA_FILE)]
        };
        for (flag, key) in files {
            let Some(path) = flag_value(&inv.argv, flag) else {
                continue;
            };
            match pod_file_source(pod, c, &path) {
                Some((s, k)) if s == secret && k == key => {}
                other => gaps.push(format!(
                    "{variant}: {role} {flag} {path} is not key {key} of the Secret {secret} \
                     mounted there (found {other:?})"
                )),
            }
        }
        if role == "worker" {
            let name = server_name(&inv.argv);
            if !step_names.contains(&name) {
                gaps.push(format!(
                    "{variant}: workers verify the name {name:?}, which the documented \
                     certificate step ({step_names:?}) does not put in the certificate"
                ));
            }
        }
    }
    gaps
}

/// Every reason a shipped path would run the control plane in plain text, or without the
/// certificate step written out. Empty when all is well.
fn tls_problems() -> Vec<String> {
    let mut gaps = Vec::new();
    let root = support::root();

    // The step itself: a script, run as it stands.
    let step = root.join(CERT_STEP);
    match std::fs::metadata(&step) {
        Err(_) => gaps.push(format!(
            "{CERT_STEP}: the certificate step does not exist (compose and Slurm run it, \
             Kubernetes documents it)"
        )),
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o111 == 0 {
                gaps.push(format!("{CERT_STEP}: not executable"));
            }
        }
    }

    // Kubernetes: the Secret comes from the documented step; both builds mount it.
    let secret_text = std::fs::read_to_string(deploy().join("k8s/secret.yaml")).unwrap();
    let step_names: Vec<String> = cert_step_commands(&secret_text)
        .into_iter()
        .flat_map(|words| words.into_iter().skip(1))
        .collect();
    if step_names.is_empty() {
        gaps.push(
            "deploy/k8s/secret.yaml: no `make-certs.sh DIR NAME...` line: the certificate \
             step for Kubernetes is not written out"
                .into(),
        );
    }
    let created = secret_text.lines().find_map(|l| {
        let words = shlex::split(l.trim_start_matches('#'))?;
        let at = words
            .windows(3)
            .position(|w| w == ["create", "secret", "generic"])?;
        let name = words.get(at + 3)?.clone();
        let from: Vec<String> = words
            .iter()
            .filter_map(|w| w.strip_prefix("--from-file="))
            .map(|f| f.rsplit('/').next().unwrap().to_string())
            .collect();
        from.iter().any(|f| f == CA_FILE).then_some((name, from))
    });
    let secret = match created {
        None => {
            gaps.push(
                "deploy/k8s/secret.yaml: no `kubectl create secret generic NAME --from-file=...` \
                 for the certificates"
                    .into(),
            );
            "(none)".to_string()
        }
        Some((secret, files)) => {
            for f in [CA_FILE, CERT_FILE, KEY_FILE] {
                if !files.iter().any(|g| g == f) {
                    gaps.push(format!(
                        "deploy/k8s/secret.yaml: the Secret {secret} lacks {f}"
                    ));
                }
            }
            secret
        }
    };
    let base = deploy().join("k8s");
    for dir in [base.clone(), base.join("overlays/cpu")] {
        let (docs, _) = kustomize(&dir).unwrap_or_else(|e| panic!("{e}"));
        gaps.extend(kubernetes_tls_gaps(&docs, &rel(&dir), &step_names, &secret));
    }

    // compose: a service runs the step into a volume that the others mount and wait for.
    let compose_path = deploy().join("compose.yaml");
    let doc = &yaml_documents(&compose_path)[0];
    let services = get(doc, &["services"])
        .and_then(|s| s.as_mapping())
        .unwrap();
    let words = |v: Option<&Yaml>| strings(v);
    let certs = services.iter().find(|(_, s)| {
        words(s.get("entrypoint"))
            .iter()
            .chain(&words(s.get("command")))
            .any(|w| w.ends_with("make-certs.sh"))
    });
    let volume_at = |svc: &Yaml, path: &str| -> Option<String> {
        strings(svc.get("volumes")).iter().find_map(|v| {
            let mut parts = v.split(':');
            let (volume, inside) = (parts.next()?, parts.next()?);
            (inside.trim_end_matches('/') == path).then(|| volume.to_string())
        })
    };
    let services_run = compose_services("deploy/compose.yaml", doc);
    for (_, inv, env) in &services_run {
        gaps.extend(tls_gaps(inv, env));
    }
    match certs {
        None => gaps.push("deploy/compose.yaml: no service runs make-certs.sh".into()),
        Some((certs_name, certs_svc)) => {
            let certs_name = certs_name.as_str().unwrap();
            let all: Vec<String> = words(certs_svc.get("entrypoint"))
                .into_iter()
                .chain(words(certs_svc.get("command")))
                .collect();
            let at = all
                .iter()
                .position(|w| w.ends_with("make-certs.sh"))
                .unwrap();
            let (dir, names) = (all[at + 1].clone(), all[at + 2..].to_vec());
            let volume = volume_at(certs_svc, &dir);
            if volume.is_none() {
                gaps.push(format!(
                    "deploy/compose.yaml: {certs_name} writes {dir}, not a volume"
                ));
            }
            for (name, inv, _) in &services_run {
                let svc = services.get(name.as_str()).unwrap();
                let role = inv.argv.first().cloned().unwrap_or_default();
                let files: &[(&str, &str)] = match role.as_str() {
                    "coordinator" => &[("--tls-cert", CERT_FILE), ("--tls-key", KEY_FILE)],
                    "worker" => &[("--tls-ca", CA_FILE)],
                    _ => &[],
                };
                for (flag, file) in files {
                    let Some(path) = flag_value(&inv.argv, flag) else {
                        continue;
                    };
                    let (in_dir, f) = path.rsplit_once('/').unwrap_or(("", &path));
                    if f != *file || volume.is_none() || volume_at(svc, in_dir) != volume {
                        gaps.push(format!(
                            "deploy/compose.yaml: {name} {flag} {path} is not the {file} that \
                             {certs_name} writes into volume {volume:?}"
                        ));
                    }
                }
                if role == "coordinator" {
                    let waits = str_at(svc, &["depends_on", certs_name, "condition"]);
                    if waits != Some("service_completed_successfully") {
                        gaps.push(format!(
                            "deploy/compose.yaml: {name} does not wait for {certs_name} to \
                             complete (depends_on condition {waits:?})"
                        ));
                    }
                }
                if role == "worker" && !names.contains(&server_name(&inv.argv)) {
                    gaps.push(format!(
                        "deploy/compose.yaml: {name} verifies the name {:?}, not among the \
                         certificate's {names:?}",
                        server_name(&inv.argv)
                    ));
                }
            }
        }
    }

    // Slurm: the script runs the step before the coordinator, into the files they use.
    let sbatch_path = deploy().join("slurm/ferry.sbatch");
    let sbatch = std::fs::read_to_string(&sbatch_path).unwrap();
    let invocations = shell_invocations("deploy/slurm/ferry.sbatch", &sbatch);
    let exported: Vec<String> = ferry_env_names("", &sbatch)
        .into_iter()
        .filter(|(_, n)| sbatch.contains(&format!("export {n}=")))
        .map(|(_, n)| n)
        .collect();
    for inv in &invocations {
        gaps.extend(tls_gaps(inv, &exported));
    }
    // The step the script runs, not one its comments mention.
    let code: String = sbatch
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.to_string() + "\n")
        .collect();
    match cert_step_commands(&code).first() {
        None => gaps.push("deploy/slurm/ferry.sbatch: does not run make-certs.sh".into()),
        Some(step) => {
            let dir = step.first().cloned().unwrap_or_default();
            let names = &step[1.min(step.len())..];
            // 1-based lines: of the step (not a comment), and of the coordinator's command.
            let step_line = sbatch
                .lines()
                .position(|l| !l.trim_start().starts_with('#') && l.contains("make-certs.sh"))
                .map(|n| n + 1);
            let coordinator_line = invocations
                .iter()
                .find(|i| i.argv.first().map(String::as_str) == Some("coordinator"))
                .and_then(|i| i.origin.rsplit(':').next()?.parse::<usize>().ok());
            if !matches!((step_line, coordinator_line), (Some(s), Some(c)) if s < c) {
                gaps.push(format!(
                    "deploy/slurm/ferry.sbatch: the certificate step (line {step_line:?}) does \
                     not run before the coordinator starts (line {coordinator_line:?})"
                ));
            }
            for inv in &invocations {
                let role = inv.argv.first().map(String::as_str).unwrap_or("");
                let want: &[(&str, &str)] = match role {
                    "coordinator" => &[("--tls-cert", CERT_FILE), ("--tls-key", KEY_FILE)],
                    "worker" | "status" => &[("--tls-ca", CA_FILE)],
                    _ => &[],
                };
                for (flag, file) in want {
                    if let Some(path) = flag_value(&inv.argv, flag) {
                        if path != format!("{dir}/{file}") {
                            gaps.push(format!("{}: {flag} {path}, not {dir}/{file}", inv.origin));
                        }
                    }
                }
                if role == "worker" && !names.contains(&server_name(&inv.argv)) {
                    gaps.push(format!(
                        "{}: the worker verifies {:?}, not among the certificate's {names:?}",
                        inv.origin,
                        server_name(&inv.argv)
                    ));
                }
            }
        }
    }

    // The README says what TLS protects and what it does not; deploy/README.md points there.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    if !readme.lines().any(|l| l == "## Security") {
        gaps.push("README.md: no \"## Security\" section".into());
    }
    let deploy_readme = std::fs::read_to_string(deploy().join("README.md")).unwrap();
    if !deploy_readme.contains("README.md#security") {
        gaps.push("deploy/README.md: no link to the README's security section".into());
    }
    gaps
}

#[test]
fn every_shipped_path_serves_the_control_plane_over_tls_from_the_written_out_certificate_step() {
    let gaps = tls_problems();
    assert!(
        gaps.is_empty(),
        "shipped paths without TLS or without the certificate step:\n  {}",
        gaps.join("\n  ")
    );
}

/// The certificate step for real: its files serve TLS, clients that hold its CA reach the
/// coordinator under the names the manifests dial, and nothing else does.
#[test]
fn make_certs_gives_a_tls_coordinator_reached_with_its_ca_under_the_manifests_names_only() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Output};
    let openssl = Command::new("openssl").arg("version").output();
    assert!(
        openssl.as_ref().is_ok_and(|o| o.status.success()),
        "\n\n*** openssl is not installed, so {CERT_STEP}, the certificate step of every shipped \
         deploy path, cannot be tested. Install it (apt-get install openssl; scripts/test.sh \
         does). ***\n\n"
    );
    let dir = support::scratch("make-certs");
    let make = |out: &Path, names: &[&str]| -> Output {
        support::run_ok(
            Command::new(support::root().join(CERT_STEP))
                .arg(out)
                .args(names),
        )
    };
    // The names the Kubernetes workers (the Service) and the compose workers (the service)
    // verify; Slurm's is the host name, which the test cannot be.
    let certs = dir.join("certs");
    make(&certs, &["ferry-coordinator", "coordinator"]);
    let other = dir.join("other");
    make(&other, &["ferry-coordinator", "coordinator"]);

    // Readable by the user only; the CA's key is gone.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&certs), 0o700);
    for f in [CA_FILE, CERT_FILE, KEY_FILE] {
        assert_eq!(mode(&certs.join(f)), 0o600, "{f}");
    }
    assert_eq!(support::names(&certs), [CA_FILE, CERT_FILE, KEY_FILE]);
    // Run again (compose and Slurm do, at every start), it keeps them; a new name remakes them.
    let before = std::fs::read(certs.join(CA_FILE)).unwrap();
    let again = make(&certs, &["coordinator"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("kept"));
    assert_eq!(std::fs::read(certs.join(CA_FILE)).unwrap(), before);
    let renamed = dir.join("renamed");
    make(&renamed, &["one"]);
    let first = std::fs::read(renamed.join(CA_FILE)).unwrap();
    make(&renamed, &["two"]);
    assert_ne!(std::fs::read(renamed.join(CA_FILE)).unwrap(), first);

    let c = support::cluster::CoordinatorProc::start(
        "make-certs-coordinator",
        &support::cluster::job_toml(&dir.join("run"), 8, 8, 64, ""),
        &[
            "--tls-cert",
            certs.join(CERT_FILE).to_str().unwrap(),
            "--tls-key",
            certs.join(KEY_FILE).to_str().unwrap(),
        ],
    );
    let log = c.log_text();
    assert!(log.contains("grpcs://"), "{log}");
    assert!(!log.contains("without TLS"), "{log}");
    let port = c.grpc.rsplit_once(':').unwrap().1.to_string();
    let ca = certs.join(CA_FILE);
    let ca = ca.to_str().unwrap();
    let wrong_ca = other.join(CA_FILE);
    let wrong_ca = wrong_ca.to_str().unwrap();
    let at = |host: &str| format!("{host}:{port}");
    // (what, flags, environment, whether it gets through)
    let cases: Vec<(&str, Vec<String>, Vec<(&str, &str)>, bool)> = vec![
        (
            "the Kubernetes name, by flags",
            vec![
                "--coordinator".into(),
                at("127.0.0.1"),
                "--tls-ca".into(),
                ca.into(),
                "--tls-domain".into(),
                "ferry-coordinator".into(),
            ],
            vec![],
            true,
        ),
        (
            "the compose name, by FERRY_TLS_CA and FERRY_TLS_DOMAIN",
            vec!["--coordinator".into(), at("127.0.0.1")],
            vec![("FERRY_TLS_CA", ca), ("FERRY_TLS_DOMAIN", "coordinator")],
            true,
        ),
        (
            "localhost, the name in the address",
            vec![
                "--coordinator".into(),
                at("localhost"),
                "--tls-ca".into(),
                ca.into(),
            ],
            vec![],
            true,
        ),
        (
            "127.0.0.1, the address itself",
            vec![
                "--coordinator".into(),
                at("127.0.0.1"),
                "--tls-ca".into(),
                ca.into(),
            ],
            vec![],
            true,
        ),
        (
            "no CA: plain text",
            vec!["--coordinator".into(), at("127.0.0.1")],
            vec![],
            false,
        ),
        (
            "another deployment's CA",
            vec![
                "--coordinator".into(),
                at("127.0.0.1"),
                "--tls-ca".into(),
                wrong_ca.into(),
                "--tls-domain".into(),
                "ferry-coordinator".into(),
            ],
            vec![],
            false,
        ),
        (
            "a name not in the certificate",
            vec![
                "--coordinator".into(),
                at("127.0.0.1"),
                "--tls-ca".into(),
                ca.into(),
                "--tls-domain".into(),
                "ferry-coordinator.elsewhere".into(),
            ],
            vec![],
            false,
        ),
    ];
    // A refused client retries for the admin commands' patience (10 s): all at once.
    let token_file = &c.token_file;
    let results: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(_, args, env, _)| {
                s.spawn(move || {
                    let mut cmd = support::ferry();
                    cmd.args(["status", "--json", "--token-file"])
                        .arg(token_file)
                        .args(args)
                        .env_remove("FERRY_TLS_CA")
                        .env_remove("FERRY_TLS_DOMAIN");
                    for (k, v) in env {
                        cmd.env(k, v);
                    }
                    cmd.output().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((what, args, env, ok), out) in cases.iter().zip(&results) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: {} {}", out.status, stderr.trim());
        assert_eq!(
            out.status.success(),
            *ok,
            "{what}: {args:?} {env:?}: {stderr}"
        );
        if *ok {
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(st["job_name"], "coordinator-test", "{what}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        }
    }
}
