//! augur-dist: process-group backends for data-parallel training across processes and machines.
//!
//! [`augur_nn::dist::ProcessGroup`] is the interface and [`augur_nn::dist::Ddp`] the bucketed,
//! overlapped gradient averaging; this crate adds the MPI backend (feature `mpi`, through the
//! `mpi` crate over the system's OpenMPI or MPICH; launch with `mpirun -np N augur train --ddp`)
//! and the NCCL backend (feature `cuda`, one GPU per process; launch with
//! `augur train --ddp nccl --nproc N`).

#![warn(missing_docs)]

pub use augur_nn::dist::{Ddp, DeviceCollectives, ProcessGroup, Solo, ThreadGroup};

/// The MPI process group (feature `mpi`).
#[cfg(feature = "mpi")]
pub mod mpi_group {
    use augur_nn::dist::ProcessGroup;
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use mpi::Threading;

    /// MPI's world communicator as a process group.
    pub struct MpiGroup {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        _universe: mpi::environment::Universe,
    }

    // SAFETY: MPI is initialised with at least `Threading::Serialized`, which allows calls from
    // any thread as long as no two overlap. `Ddp` calls collectives from one communication thread
    // during the backward pass and from the training thread only after joining it.
    unsafe impl Send for MpiGroup {}
    unsafe impl Sync for MpiGroup {}

    impl MpiGroup {
        /// Initialise MPI (once per process). `None` when MPI cannot give serialized threading.
        pub fn init() -> Option<Self> {
            let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)?;
            if threading < Threading::Serialized {
                return None;
            }
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Some(MpiGroup { world, rank, size, _universe: universe })
        }
    }

    impl ProcessGroup for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
        }
        fn barrier(&self) {
            self.world.barrier();
        }
    }
}

/// The NCCL process group (feature `cuda`): collectives between processes, one GPU each.
#[cfg(feature = "cuda")]
pub mod nccl_group {
    use augur_core::Tensor;
    use augur_cuda::{Nccl, Place};
    use augur_nn::dist::{DeviceCollectives, ProcessGroup};

    /// An NCCL communicator as a process group: gradients on the rank's GPU are averaged where
    /// they are ([`DeviceCollectives`]); host buffers are staged through the GPU.
    pub struct NcclGroup(pub Nccl);

    impl NcclGroup {
        /// Join the run the launcher's environment describes (see [`Place::from_env`]).
        pub fn from_env() -> augur_cuda::Result<Self> {
            Ok(NcclGroup(Nccl::join(&Place::from_env()?)?))
        }
    }

    /// A collective that fails leaves the ranks out of step: no rank can go on, so the process
    /// ends with the reason (the launcher reports which rank failed).
    fn or_exit(r: augur_cuda::Result<()>) {
        if let Err(e) = r {
            eprintln!("error: {e}; this rank cannot continue");
            std::process::exit(3);
        }
    }

    impl ProcessGroup for NcclGroup {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world(&self) -> usize {
            self.0.world()
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            or_exit(self.0.all_reduce_sum(buf));
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) {
            or_exit(self.0.broadcast(buf, root));
        }
        fn barrier(&self) {
            or_exit(self.0.barrier());
        }
        fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
            Some(self)
        }
    }

    fn nn_err(e: augur_cuda::Error) -> augur_nn::Error {
        augur_nn::Error::Invalid(e.to_string())
    }

    impl DeviceCollectives for NcclGroup {
        fn all_reduce_mean(&self, t: &Tensor) -> augur_nn::Result<()> {
            self.0.all_reduce_mean(t).map_err(nn_err)
        }
        fn fence(&self, t: &Tensor) -> augur_nn::Result<()> {
            self.0.fence(t).map_err(nn_err)
        }
    }
}
