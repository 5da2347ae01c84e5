//! The gradient all-reduce overlapped with the backward pass, as DDP does it.
//!
//! Before the last micro-batch's backward, every parameter gets a hook that fires once its
//! gradient is final (libtorch's post-accumulate-grad hook, through `csrc/grad_hooks.cpp`).
//! When the last gradient of a bucket ([`Buckets`]) is final, the hook copies the bucket into
//! one vector and hands it to a communication thread, which sums the buckets over the ring in
//! bucket order, the same order on every rank whatever order their backward finished them in.
//! The main thread goes on with backward meanwhile. Afterwards, buckets no hook completed
//! (parameters this step did not touch, or a rank with no micro-batch) are handed over too,
//! every reduced bucket is written back into the gradients, and the step's scalars are summed.
//! The buckets, their order and the arithmetic are those of [`all_reduce_grads`], so the
//! result is bit-identical to reducing after backward.
//!
//! On the GPU the copy a hook makes is only enqueued when it returns, and NCCL's kernels
//! would queue behind the rest of backward on the one default stream. So with a collective
//! that has a [`StreamMarker`] (NCCL), the hook also records a mark right after the copy
//! (casting it to bfloat16 first when the job carries bf16 gradients, as the plain path
//! does before its sum), and the communication thread sums with
//! [`Collective::all_reduce_sum_after`], which waits for that mark on a side stream. The ring
//! collectives (TCP and shared memory) need no mark: the copy is complete when the hook
//! returns.
//!
//! [`all_reduce_grads`]: super::flat::all_reduce_grads

use super::flat::{all_reduce_scalars, ensure_grads, reduce_bucket, Buckets};
use ferry_collective::{Collective, CollectiveError, StreamMark, StreamMarker};
use ferry_engine::models::ParamStore;
use ferry_engine::train::Engine;
use ferry_spec::job::GradientDtype;
use std::collections::BTreeMap;
use std::os::raw::c_void;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};

type GradReadyFn = extern "C" fn(ctx: *mut c_void, index: i64);

extern "C" {
    fn ferry_set_grad_ready_hook(
        tensor: *mut c_void,
        f: Option<GradReadyFn>,
        ctx: *mut c_void,
        index: i64,
    ) -> i32;
}

/// A bucket on its way to the communication thread: its index, its gradients in one vector,
/// and where on the device that vector's copy ends (device collectives only).
struct Handed {
    bucket: usize,
    flat: Tensor,
    mark: Option<StreamMark>,
}

/// What the hooks share: which gradients are final, and where finished buckets go.
struct Hooks<'a> {
    ps: &'a ParamStore,
    buckets: &'a Buckets,
    bucket_of: Vec<usize>,
    /// The device collective's marker, and whether buckets go to it as bfloat16.
    marker: Option<(Arc<dyn StreamMarker>, bool)>,
    state: Mutex<HookState>,
}

struct HookState {
    /// Per bucket, parameters whose gradient is not final yet.
    waiting: Vec<usize>,
    handed_over: Vec<bool>,
    to_comm: Option<mpsc::Sender<Handed>>,
    /// A hook that failed (a panic in tensor code); the step then fails.
    failed: Option<String>,
}

impl Hooks<'_> {
    fn hand_over(&self, s: &mut HookState, b: usize) {
        if s.handed_over[b] {
            return;
        }
        s.handed_over[b] = true;
        let mut flat = self.buckets.flatten(self.ps, b);
        let mut mark = None;
        if let Some((marker, bf16)) = &self.marker {
            if *bf16 {
                flat = flat.to_kind(Kind::BFloat16);
            }
            match marker.mark() {
                Ok(m) => mark = Some(m),
                Err(e) => {
                    s.failed = Some(format!("bucket {b}: {e}"));
                    return;
                }
            }
        }
        if let Some(tx) = &s.to_comm {
            // The communication thread is gone only after a failure, which it reports.
            let _ = tx.send(Handed {
                bucket: b,
                flat,
                mark,
            });
        }
    }

    fn ready(&self, index: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&b) = self.bucket_of.get(index) else {
            return;
        };
        s.waiting[b] = s.waiting[b].saturating_sub(1);
        if s.waiting[b] == 0 {
            self.hand_over(&mut s, b);
        }
    }
}

extern "C" fn on_grad_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: ctx is the `Hooks` armed below, alive until the hooks are cleared.
    let hooks = unsafe { &*(ctx as *const Hooks) };
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hooks.ready(index as usize)));
    if caught.is_err() {
        let mut s = hooks.state.lock().unwrap_or_else(|e| e.into_inner());
        s.failed = Some(format!("the gradient hook of parameter {index} panicked"));
    }
}

/// Sets (or with `hooks` None clears) every parameter's gradient-ready hook.
fn set_hooks(ps: &ParamStore, hooks: Option<&Hooks>) -> Result<(), String> {
    for (i, (name, p)) in ps.named().iter().enumerate() {
        let mut handle = p.shallow_clone();
        let (f, ctx) = match hooks {
            Some(h) => (
                Some(on_grad_ready as GradReadyFn),
                h as *const Hooks as *mut c_void,
            ),
            None => (None, std::ptr::null_mut()),
        };
        // SAFETY: as_mut_ptr is tch's at::Tensor*; the shim catches every exception.
        let rc = unsafe { ferry_set_grad_ready_hook(handle.as_mut_ptr().cast(), f, ctx, i as i64) };
        if rc != 0 {
            return Err(format!("cannot set the gradient hook of {name}"));
        }
    }
    Ok(())
}

/// What a step's overlapped forward, backward and all-reduce came to.
pub enum Overlapped {
    /// The summed scalars (the step's loss first), and how long the step waited for the
    /// network after backward: the communication it could not hide.
    Reduced { scalars: Vec<f64>, exposed_s: f64 },
    /// The collective failed: the group must re-form.
    Failed(CollectiveError),
}

/// Forward and backward of this rank's micro-batches of `step`, with the gradient all-reduce
/// running while the last backward does; then the step's partial loss is summed, with
/// `extra_scalars` after it.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_all_reduce(
    engine: &mut Engine,
    step: u64,
    first_micro: u64,
    sequences: &[u64],
    extra_scalars: &[f64],
    buckets: &Buckets,
    dtype: GradientDtype,
    coll: &mut dyn Collective,
) -> anyhow::Result<Overlapped> {
    let n = buckets.members.len();
    let (to_comm, from_main) = mpsc::channel::<Handed>();
    let (to_main, from_comm) = mpsc::channel::<Result<(usize, Tensor), CollectiveError>>();
    let ps = engine.ps.clone_handles();
    let mut bucket_of = vec![usize::MAX; ps.named().len()];
    for (b, members) in buckets.members.iter().enumerate() {
        for &i in members {
            bucket_of[i] = b;
        }
    }
    let marker = coll
        .stream_marker()
        .map(|m| (m, dtype == GradientDtype::Bf16));
    let hooks = Hooks {
        ps: &ps,
        buckets,
        bucket_of,
        marker,
        state: Mutex::new(HookState {
            waiting: buckets.members.iter().map(Vec::len).collect(),
            handed_over: vec![false; n],
            to_comm: Some(to_comm),
            failed: None,
        }),
    };
    let comm_coll: &mut dyn Collective = &mut *coll;
    let (loss, reduced) = std::thread::scope(|scope| {
        let comm = scope.spawn(move || {
            let coll = comm_coll;
            // Buckets are summed in index order on every rank; early arrivals wait here.
            let mut early = BTreeMap::new();
            let mut next = 0;
            while next < n {
                let Ok(handed) = from_main.recv() else { return };
                early.insert(handed.bucket, handed);
                while let Some(Handed { mut flat, mark, .. }) = early.remove(&next) {
                    let result = match &mark {
                        Some(mark) => coll.all_reduce_sum_after(&mut flat, mark),
                        None => reduce_bucket(&mut flat, dtype, coll),
                    };
                    let failed = result.is_err();
                    let _ = to_main.send(result.map(|()| (next, flat)));
                    if failed {
                        return;
                    }
                    next += 1;
                }
            }
        });
        let result = (|| -> anyhow::Result<f64> {
            let mut armed = Ok(());
            let loss = engine.forward_backward_hooked(step, first_micro, sequences, &mut || {
                armed = set_hooks(&ps, Some(&hooks));
            });
            set_hooks(&ps, None).map_err(anyhow::Error::msg)?;
            armed.map_err(anyhow::Error::msg)?;
            Ok(loss?)
        })();
        // Whatever no hook handed over, and then nothing more: the thread ends after the last.
        let backward_done = std::time::Instant::now();
        let mut s = hooks.state.lock().unwrap_or_else(|e| e.into_inner());
        if result.is_ok() && s.failed.is_none() {
            ensure_grads(&ps);
            for b in 0..n {
                hooks.hand_over(&mut s, b);
            }
        }
        s.to_comm = None;
        let failed_hook = s.failed.take();
        drop(s);
        let mut reduced: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        let mut collective = None;
        if result.is_ok() && failed_hook.is_none() {
            for _ in 0..n {
                match from_comm.recv() {
                    Ok(Ok((b, flat))) => reduced[b] = Some(flat),
                    Ok(Err(e)) => {
                        collective = Some(e);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let _ = comm.join();
        let outcome = match (result, failed_hook, collective) {
            (Err(e), _, _) => Err(e),
            (_, Some(why), _) => Err(anyhow::anyhow!(why)),
            (Ok(_), None, Some(e)) => Ok(Err(e)),
            (Ok(loss), None, None) => Ok(Ok(loss)),
        };
        (outcome, (reduced, backward_done))
    });
    let (reduced, backward_done) = reduced;
    let loss = match loss? {
        Ok(loss) => loss,
        Err(e) => return Ok(Overlapped::Failed(e)),
    };
    for (b, flat) in reduced.iter().enumerate() {
        match flat {
            Some(flat) => buckets.unflatten(&ps, b, flat),
            None => {
                return Ok(Overlapped::Failed(CollectiveError::Io {
                    context: "overlapped all-reduce".into(),
                    source: std::io::Error::other(format!("bucket {b} was never reduced")),
                }))
            }
        }
    }
    let scalars: Vec<f64> = std::iter::once(loss)
        .chain(extra_scalars.iter().copied())
        .collect();
    match all_reduce_scalars(&ps, &scalars, coll) {
        Ok(scalars) => Ok(Overlapped::Reduced {
            scalars,
            exposed_s: backward_done.elapsed().as_secs_f64(),
        }),
        Err(e) => Ok(Overlapped::Failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The hooks fire during backward, once per parameter, after its gradient is final: each
    /// bucket arrives complete (its vector equals the gradients after backward), and a
    /// parameter that backward does not reach is left for the caller to hand over.
    #[test]
    fn hooks_hand_over_each_bucket_as_its_last_gradient_is_final() {
        let mut ps = ParamStore::new(Device::Cpu);
        let a = ps.normal("a", &[3], 1.0);
        let b = ps.normal("b", &[4], 1.0);
        let _unused = ps.normal("unused", &[2], 1.0);
        let tied = ps.normal("tied", &[3], 1.0);
        // One bucket per parameter, in the reduction order Buckets uses (reverse).
        let buckets = Buckets {
            members: vec![vec![3], vec![2], vec![1], vec![0]],
        };
        let (tx, rx) = mpsc::channel();
        let hooks = Hooks {
            ps: &ps,
            buckets: &buckets,
            bucket_of: vec![3, 2, 1, 0],
            marker: None,
            state: Mutex::new(HookState {
                waiting: vec![1; 4],
                handed_over: vec![false; 4],
                to_comm: Some(tx),
                failed: None,
            }),
        };
        set_hooks(&ps, Some(&hooks)).unwrap();
        // `tied` is used twice, as a shared embedding and output matrix are: its hook must
        // fire once, with both uses summed.
        let loss = (&a * &tied).sum(Kind::Float)
            + (&b * 3.0).sum(Kind::Float)
            + (&tied * 2.0).sum(Kind::Float);
        loss.backward();
        set_hooks(&ps, None).unwrap();
        let got: Vec<(usize, Tensor)> = rx
            .try_iter()
            .map(|h: Handed| {
                assert!(h.mark.is_none(), "a host collective gets no marks");
                (h.bucket, h.flat)
            })
            .collect();
        let mut order: Vec<usize> = got.iter().map(|(b, _)| *b).collect();
        order.sort_unstable();
        assert_eq!(
            order,
            vec![0, 2, 3],
            "bucket_of maps parameter i to bucket 3 - i: the unused parameter's (1) stays"
        );
        for (bucket, flat) in &got {
            let expected = buckets.flatten(&ps, *bucket);
            assert!(flat.equal(&expected), "bucket {bucket}");
        }
        let s = hooks.state.lock().unwrap();
        assert!(s.failed.is_none());
        assert_eq!(s.waiting, vec![0, 1, 0, 0]);
        drop(s);
        // Cleared: another backward fires nothing.
        let (tx2, rx2) = mpsc::channel::<Handed>();
        drop(tx2);
        (&a * 2.0).sum(Kind::Float).backward();
        assert!(rx2.try_iter().next().is_none());
    }

    /// Numbers its marks and notes the thread that made each, as a device marker would be
    /// called: by whichever thread ran the hook.
    struct NumberingMarker {
        made: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl StreamMarker for NumberingMarker {
        fn mark(&self) -> Result<StreamMark, CollectiveError> {
            let mut made = self.made.lock().unwrap();
            made.push(std::thread::current().id());
            Ok(StreamMark::new(made.len() - 1))
        }
    }

    /// With a device collective (NCCL's marker), each bucket is marked once, after its copy
    /// and in the order buckets become ready, and carries bfloat16 when the job says so:
    /// exactly the vector the plain path would cast before its sum.
    #[test]
    fn a_device_collective_gets_each_bucket_marked_after_its_copy() {
        let mut ps = ParamStore::new(Device::Cpu);
        let a = ps.normal("a", &[5], 1.0);
        let b = ps.normal("b", &[3], 1.0);
        let buckets = Buckets {
            members: vec![vec![1], vec![0]],
        };
        let marker = Arc::new(NumberingMarker {
            made: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel();
        let hooks = Hooks {
            ps: &ps,
            buckets: &buckets,
            bucket_of: vec![1, 0],
            marker: Some((marker.clone() as Arc<dyn StreamMarker>, true)),
            state: Mutex::new(HookState {
                waiting: vec![1; 2],
                handed_over: vec![false; 2],
                to_comm: Some(tx),
                failed: None,
            }),
        };
        set_hooks(&ps, Some(&hooks)).unwrap();
        // b's gradient is final first: b feeds the last operation.
        let h = (&a * 1.5).sum(Kind::Float);
        (h * &b).sum(Kind::Float).backward();
        set_hooks(&ps, None).unwrap();
        let got: Vec<Handed> = rx.try_iter().collect();
        assert_eq!(got.len(), 2);
        for (i, h) in got.iter().enumerate() {
            let number = h.mark.as_ref().and_then(|m| m.get::<usize>()).copied();
            assert_eq!(number, Some(i), "one mark per bucket, in hand-over order");
            assert_eq!(h.flat.kind(), Kind::BFloat16);
            let expected = buckets.flatten(&ps, h.bucket).to_kind(Kind::BFloat16);
            assert!(h.flat.equal(&expected), "bucket {}", h.bucket);
        }
        assert!(hooks.state.lock().unwrap().failed.is_none());
        assert_eq!(marker.made.lock().unwrap().len(), 2);
    }
}
