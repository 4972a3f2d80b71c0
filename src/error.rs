//! The crate's one error type.

use crate::tensor::DType;

/// Every failure of the public API. Bad input is reported before anything is written; bad data
/// that only the device sees (a dataset index, a label) is reported by the kernels through an
/// error record, and the op then writes nothing either.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
// Each variant's doc and Display text say what its fields hold.
#[allow(missing_docs)]
pub enum Error {
    /// A tensor's shape differs from the one the op needs.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch { what: &'static str, expected: Vec<usize>, got: Vec<usize> },
    /// A shape the op cannot take at all (wrong rank, a zero or too large dimension).
    #[error("invalid shape {shape:?} for {what}: {reason}")]
    InvalidShape { what: &'static str, shape: Vec<usize>, reason: String },
    /// A tensor's element type differs from the one the op needs.
    #[error("dtype mismatch for {what}: expected {expected}, got {got}")]
    DTypeMismatch { what: &'static str, expected: DType, got: DType },
    /// The op has no kernel for this element type.
    #[error("unsupported dtype {dtype} for {what}")]
    UnsupportedDType { what: &'static str, dtype: DType },
    /// A sample's dataset index is negative or not below the number of datasets.
    #[error("dataset index {index} of sample {sample} is out of range: there are {num_datasets} datasets")]
    DatasetIndexOutOfRange { sample: usize, index: i64, num_datasets: usize },
    /// A label that is neither a class of its dataset's head nor the ignore label 255.
    #[error("invalid label {label} for dataset {dataset} at element {position}: valid labels are 0..{num_classes} and 255 (ignore)")]
    InvalidLabel { dataset: usize, label: i64, position: usize, num_classes: usize },
    /// A prediction handed to the confusion matrix that is not a class of its dataset's head.
    #[error(
        "invalid prediction {prediction} for dataset {dataset} at pixel {position}: valid classes are 0..{num_classes}"
    )]
    InvalidPrediction { dataset: usize, prediction: i64, position: usize, num_classes: usize },
    /// Training batch statistics of a dataset with a single value per channel (PyTorch refuses too).
    #[error("batch statistics need more than one value per channel in training; dataset {dataset} has {count}")]
    TooFewValues { dataset: usize, count: usize },
    /// An argument outside its domain (eps, momentum, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Tensors of one op live on different devices.
    #[error("tensors live on different devices: {first} and {second}")]
    DeviceMismatch { first: String, second: String },
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    /// The driver is there but the ordinal names no GPU.
    #[error("no CUDA device with ordinal {ordinal} ({count} present)")]
    NoDevice { ordinal: usize, count: usize },
    /// The crate was built without nvcc, so it holds no GPU kernels.
    #[error("this build has no CUDA kernels: nvcc was not found when the crate was built")]
    CudaNotBuilt,
    /// A CUDA driver or runtime call failed: `code` and `name` are the CUDA error's number and
    /// name (`CUDA_ERROR_ILLEGAL_ADDRESS`, `cudaErrorInvalidDeviceFunction`), `message` its
    /// description, `kernel` the kernel or driver call it was reported against (with
    /// `CDCL_SYNC_LAUNCHES=1`, always the kernel that faulted).
    #[error("CUDA error {name} ({code}) in {kernel}: {message}")]
    Cuda { code: i32, name: String, kernel: String, message: String },
    /// The GPU exists but this build cannot run on it (compute capability, driver version, or
    /// the test launch failed): `reason` says which.
    #[error("CUDA device {ordinal} cannot run this build: {reason}")]
    UnsupportedDevice { ordinal: usize, reason: String },
    /// The emulator stopped a kernel that broke a CUDA rule (or was misconfigured).
    #[error("emulator fault in {kernel}: {message}")]
    EmulatorFault { kernel: String, message: String },
    /// A device allocation failed.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    /// A checkpoint could not be written, read or used: `path` is the file (or "(in memory)"),
    /// `message` what went wrong.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    /// A dataset file or folder that cannot be used (missing, unreadable, corrupt or truncated
    /// image, a label map of another size than its image, a label outside the dataset's
    /// classes, an empty split): `path` names it, `message` says what is wrong.
    #[error("{path}: {message}")]
    Data { path: String, message: String },
    /// A collective or the rendezvous of a distributed run failed: a rank that did not arrive
    /// in time or left, ranks that disagree (world size, the collective, its length), a bad
    /// launcher variable (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, …).
    #[error("distributed: {message}")]
    Distributed { message: String },
    /// libnccl could not be loaded: multi-GPU collectives need NCCL on the machine.
    #[error("no NCCL: libnccl could not be loaded (install NCCL, or use one GPU)")]
    NoNccl,
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
