//! NCCL between processes, one GPU each: the transport of data-parallel training
//! (`augur_dist::NcclGroup`) and of the all-reduce benchmark.
//!
//! A process learns its place from the environment that `augur ... --nproc N` (or any launcher)
//! sets: `AUGUR_RANK`, `AUGUR_WORLD`, and `AUGUR_NCCL_ID`, a file through which rank 0 hands the
//! others NCCL's unique id. Rank r uses device r modulo the devices present.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use augur_core::Tensor;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::result as nc;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use cudarc::nccl::Id;

use crate::train::Cuda;
use crate::{Error, Result};

/// How long a rank waits for rank 0's id file.
const ID_WAIT: Duration = Duration::from_secs(120);

/// An NCCL communicator handle, destroyed on drop.
struct Comm(ncclComm_t);

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the handle came from `ncclCommInitRank` and is destroyed once; the owner's
        // stream work is finished or abandoned with the process.
        let _ = unsafe { nc::comm_destroy(self.0) };
    }
}

/// One rank of an NCCL communicator over all the processes of a run. Its collectives run on a
/// stream of their own, so that on device tensors they overlap the training stream's work (see
/// [`Nccl::all_reduce_mean`]).
pub struct Nccl {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    comm: Comm,
    /// Device staging for host buffers, grown on demand. Every NCCL call holds this lock, so
    /// calls from different threads never overlap.
    scratch: Mutex<Option<CudaSlice<f32>>>,
    rank: usize,
    world: usize,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls do not overlap,
// and every call is made under `scratch`'s lock.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Nccl(format!("{what}: {:?}", e.0))
}

/// Where this process sits in the run, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank 0 writes NCCL's unique id here; the others read it.
    pub id_file: PathBuf,
}

impl Place {
    /// Where this process sits, from `augur ... --nproc N` (`AUGUR_RANK`, `AUGUR_WORLD`,
    /// `AUGUR_NCCL_ID`) or from `mpirun` (Open MPI's `OMPI_COMM_WORLD_RANK`/`_SIZE`, MPICH's
    /// `PMI_RANK`/`PMI_SIZE`). Under Open MPI the id file defaults to one named after the job in the
    /// temporary directory (one host); otherwise set `AUGUR_NCCL_ID` to a path every rank can read.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Place::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |keys: &[&'static str]| -> Option<(&'static str, String)> { keys.iter().find_map(|&k| var(k).map(|v| (k, v))) };
        let num = |keys: &[&'static str]| -> Result<usize> {
            let (k, v) = first(keys).ok_or_else(|| Error::Nccl(format!("{} is not set: start the ranks with `--nproc N` (which sets AUGUR_RANK, AUGUR_WORLD and AUGUR_NCCL_ID) or with mpirun", keys[0])))?;
            v.trim().parse().map_err(|_| Error::Nccl(format!("{k} must be a non-negative integer, not `{v}`")))
        };
        let rank = num(&["AUGUR_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"])?;
        let world = num(&["AUGUR_WORLD", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])?;
        if rank >= world {
            return Err(Error::Nccl(format!("rank {rank} is not below the world size {world}")));
        }
        let id_file = match (var("AUGUR_NCCL_ID"), first(&["PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"])) {
            (Some(p), _) => PathBuf::from(p),
            (None, Some((_, job))) => std::env::temp_dir().join(format!("augur-nccl-id-job-{job}")),
            (None, None) => return Err(Error::Nccl("AUGUR_NCCL_ID is not set: under this launcher give every rank the same path to pass NCCL's id through (e.g. `mpirun -env AUGUR_NCCL_ID /shared/id ...`)".into())),
        };
        Ok(Place { rank, world, id_file })
    }
}

/// Rank 0: write `id` to `path` whole (a temporary file renamed into place).
fn publish(id: &Id, path: &Path) -> Result<()> {
    let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| Error::Nccl(format!("writing the NCCL id to {}: {e}", path.display())))
}

/// Other ranks: wait for rank 0's id.
fn fetch(path: &Path) -> Result<Id> {
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(path) {
            let mut internal = [0 as std::ffi::c_char; 128];
            if b.len() != internal.len() {
                return Err(Error::Nccl(format!("{} holds {} bytes, not an NCCL id of 128", path.display(), b.len())));
            }
            for (d, s) in internal.iter_mut().zip(b) {
                *d = s as std::ffi::c_char;
            }
            return Ok(Id::uninit(internal));
        }
        if start.elapsed() > ID_WAIT {
            return Err(Error::Nccl(format!("rank 0 did not write the NCCL id to {} within {} s", path.display(), ID_WAIT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Nccl {
    /// Join the run described by `place`: open this rank's device and the communicator (which
    /// waits for every rank).
    pub fn join(place: &Place) -> Result<Self> {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::Nccl("libnccl.so.2 could not be loaded: put NCCL's lib directory on LD_LIBRARY_PATH".into()));
        }
        if std::env::var("NCCL_NVLS_ENABLE").map_or(true, |v| v != "0") {
            // NVLink multicast can take shared GPUs out of service; never let NCCL choose it.
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if count == 0 {
            return Err(Error::NoDevice { ordinal: place.rank, count });
        }
        let ctx = CudaContext::new(place.rank % count)?;
        let stream = ctx.new_stream()?;
        let id = if place.rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("creating the NCCL id", e))?;
            publish(&id, &place.id_file)?;
            id
        } else {
            fetch(&place.id_file)?
        };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        ctx.bind_to_thread()?;
        // SAFETY: `comm` receives the new handle; the id is rank 0's, shared by every rank.
        unsafe { nc::comm_init_rank(&mut comm, place.world as i32, ncclUniqueId { internal: *id.internal() }, place.rank as i32) }.map_err(|e| nccl_err("joining the communicator", e))?;
        if place.rank == 0 {
            // Every rank has read it: joining returns once all have joined.
            let _ = std::fs::remove_file(&place.id_file);
        }
        Ok(Nccl { ctx, stream, comm: Comm(comm), scratch: Mutex::new(None), rank: place.rank, world: place.world })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The name of the device this rank uses.
    pub fn device_name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// The turn to call NCCL (see `scratch`), and the staging buffer with it.
    fn turn(&self) -> std::sync::MutexGuard<'_, Option<CudaSlice<f32>>> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An in-place f32 all-reduce (`op`) of `count` elements at `ptr`, queued on the
    /// communicator's stream. The caller holds the turn.
    fn all_reduce_at(&self, ptr: u64, count: usize, op: ncclRedOp_t) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: callers pass the address of `count` live f32 elements on this rank's device,
        // kept alive until the stream's work on them is done.
        unsafe { nc::all_reduce(ptr as *const _, ptr as *mut _, count, ncclDataType_t::ncclFloat32, op, self.comm.0, self.stream.cu_stream() as _) }.map(|_| ()).map_err(|e| nccl_err("all-reduce", e))
    }

    /// Run `op` (given the device address) on `buf` staged through device memory: copy in,
    /// collective, copy out.
    fn staged(&self, buf: &mut [f32], op: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let mut guard = self.turn();
        if guard.as_ref().is_none_or(|s| s.len() < buf.len()) {
            *guard = Some(self.stream.alloc_zeros::<f32>(buf.len().max(1))?);
        }
        let Some(s) = guard.as_mut() else { unreachable!() };
        if buf.is_empty() {
            return Ok(());
        }
        let mut view = s.slice_mut(..buf.len());
        self.stream.memcpy_htod(buf, &mut view)?;
        op(view.device_ptr(&self.stream).0)?;
        self.stream.memcpy_dtoh(&view, buf)?;
        Ok(self.stream.synchronize()?)
    }

    /// Element-wise sum of `buf` over all ranks, in place.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        self.staged(buf, |p| self.all_reduce_at(p, n, ncclRedOp_t::ncclSum))
    }

    /// `root`'s `buf` on every rank.
    pub fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let n = buf.len();
        self.staged(buf, |p| {
            self.ctx.bind_to_thread()?;
            // SAFETY: `p` addresses `n` staged f32 elements, alive until the staging syncs.
            unsafe { nc::broadcast(p as *const _, p as *mut _, n, ncclDataType_t::ncclFloat32, root as i32, self.comm.0, self.stream.cu_stream() as _) }.map(|_| ()).map_err(|e| nccl_err("broadcast", e))
        })
    }

    /// The mean of the contiguous f32 device tensor `t` over all ranks, written into `t`. It is
    /// queued after the work already queued on `t`'s device and runs on the communicator's stream
    /// beside the work queued there later; call [`Nccl::fence`] before that device's stream reads
    /// `t` again, and keep `t` alive until then.
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<()> {
        let (ptr, n, stream, ordinal) = Cuda::raw_f32(t)?;
        if ordinal != self.ctx.ordinal() {
            return Err(Error::Nccl(format!("rank {} communicates through cuda:{}, but the tensor is on cuda:{ordinal}", self.rank, self.ctx.ordinal())));
        }
        let _turn = self.turn();
        self.stream.join(&stream)?;
        self.all_reduce_at(ptr, n, ncclRedOp_t::ncclAvg)
    }

    /// Make the work queued on `t`'s device from now on wait for every collective queued so far.
    pub fn fence(&self, t: &Tensor) -> Result<()> {
        let (_, _, stream, _) = Cuda::raw_f32(t)?;
        Ok(stream.join(&self.stream)?)
    }

    /// Return once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    /// Time of `iters` in-place sum all-reduces of `bytes` of f32 already on the device (after a
    /// warm-up), each waited for: the median, in seconds.
    pub fn time_all_reduce(&self, bytes: usize, iters: usize) -> Result<f64> {
        let buf = self.stream.alloc_zeros::<f32>((bytes / 4).max(1))?;
        let ptr = buf.device_ptr(&self.stream).0;
        let mut times = Vec::with_capacity(iters);
        for i in 0..=iters {
            self.barrier()?;
            let t = Instant::now();
            {
                let _turn = self.turn();
                self.all_reduce_at(ptr, buf.len(), ncclRedOp_t::ncclSum)?;
            }
            self.stream.synchronize()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// NCCL's bus bandwidth of an all-reduce of `bytes` in `seconds` over `world` ranks:
/// `bytes / seconds · 2 (world − 1) / world` (the nccl-tests convention, comparable across world
/// sizes).
pub fn bus_bandwidth(bytes: usize, seconds: f64, world: usize) -> f64 {
    bytes as f64 / seconds * 2.0 * (world as f64 - 1.0) / world as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_follows_nccl_tests() {
        // 1 GB in 10 ms over 8 ranks: algorithm bandwidth 100 GB/s, bus bandwidth 175.
        assert!((bus_bandwidth(1_000_000_000, 0.01, 8) - 175e9).abs() < 1.0);
        assert_eq!(bus_bandwidth(1_000_000, 0.01, 1), 0.0);
    }

    #[test]
    fn place_comes_from_the_launchers_variables_with_clear_errors() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let e = Place::from_vars(vars(&[])).unwrap_err().to_string();
        assert!(e.contains("AUGUR_RANK") && e.contains("--nproc"), "{e}");
        let p = Place::from_vars(vars(&[("AUGUR_RANK", "1"), ("AUGUR_WORLD", "2"), ("AUGUR_NCCL_ID", "/x/id")])).unwrap();
        assert_eq!(p, Place { rank: 1, world: 2, id_file: "/x/id".into() });
        // Open MPI: the job names the id file.
        let p = Place::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "4"), ("PMIX_NAMESPACE", "77")])).unwrap();
        assert_eq!((p.rank, p.world), (0, 4));
        assert!(p.id_file.ends_with("augur-nccl-id-job-77"), "{:?}", p.id_file);
        // MPICH without a job id: the path must be given.
        let e = Place::from_vars(vars(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("AUGUR_NCCL_ID"), "{e}");
        let e = Place::from_vars(vars(&[("AUGUR_RANK", "2"), ("AUGUR_WORLD", "2"), ("AUGUR_NCCL_ID", "/x")])).unwrap_err().to_string();
        assert!(e.contains("not below"), "{e}");
        let e = Place::from_vars(vars(&[("AUGUR_RANK", "one"), ("AUGUR_WORLD", "2")])).unwrap_err().to_string();
        assert!(e.contains("AUGUR_RANK must be") && e.contains("`one`"), "{e}");
    }

    #[test]
    fn the_id_travels_through_its_file() {
        let dir = std::env::temp_dir().join(format!("augur-nccl-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id");
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, c) in internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as std::ffi::c_char;
        }
        publish(&Id::uninit(internal), &path).unwrap();
        assert_eq!(fetch(&path).unwrap().internal(), &internal);
        std::fs::write(&path, b"short").unwrap();
        assert!(fetch(&path).unwrap_err().to_string().contains("not an NCCL id"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
