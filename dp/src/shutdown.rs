//! SIGTERM is how orchestrators retire a worker: Kubernetes deletes the highest pods of the
//! StatefulSet on `kubectl scale --replicas N`, Slurm ends a step, `docker stop`. Dying at once
//! would make the peers' all-reduce fail and the group redo the step. Instead the worker asks
//! the coordinator to let it go at the next step boundary (`Leave`); the training loop then
//! gets RELEASED and the process exits 0. A second SIGTERM (or SIGKILL after the grace period)
//! still ends it at once.

use super::worker::SharedId;
use ferry_rpc::client::Clients;
use ferry_rpc::proto;
use std::time::Duration;

/// How long to wait for the coordinator to acknowledge the leave before exiting anyway.
const LEAVE_PATIENCE: Duration = Duration::from_secs(5);

pub fn leave_on_sigterm(rt: &tokio::runtime::Runtime, clients: &Clients, id: SharedId) {
    let mut coordinator = clients.coordinator.clone();
    rt.spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                // Without a handler SIGTERM keeps its default action: the process ends.
                Err(_) => return,
            };
        term.recv().await;
        eprintln!("SIGTERM: leaving the job at the next step boundary (again to exit now)");
        let worker_id = id.lock().map(|id| id.clone()).unwrap_or_default();
        let reply = tokio::time::timeout(
            LEAVE_PATIENCE,
            coordinator.leave(proto::LeaveRequest { worker_id }),
        )
        .await;
        match reply {
            // In a training group: the loop is released at the step boundary and exits.
            Ok(Ok(r)) if !r.get_ref().left => {}
            // Idle (already out of any group), or the coordinator did not answer.
            _ => exit_now(0),
        }
        term.recv().await;
        eprintln!("SIGTERM again: exiting now");
        exit_now(143);
    });
}

/// Ends the process without running exit handlers: the training thread may be inside libtorch,
/// whose static destructors must not run under it.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and takes no pointers.
    unsafe { libc::_exit(code) }
}
