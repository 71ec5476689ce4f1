import os

# No test may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CPU's measured matmul peak (MFU's denominator, llmlab.train.flops) is cached here, not in the
# user's ~/.cache: measured once per machine for the suite, and never mixed with real runs' entries
os.environ.setdefault("LLMLAB_CACHE_DIR", os.path.join(__import__("tempfile").gettempdir(),
                                                       f"llmlab-test-cache-{os.getuid()}"))

# Tests must pass on any CPU, whatever floating-point paths it takes. To run the suite under other
# numerics on one machine: ATEN_CPU_CAPABILITY=avx2 (or =default, no SIMD) picks torch's kernels (torch
# reads it itself), and LLMLAB_TEST_MKLDNN=0 turns oneDNN off in the test process (the CLI subprocesses a
# few tests spawn keep it on).
if os.environ.get("ATEN_CPU_CAPABILITY"):
    # inductor's on-disk cache does not tell kernels built for one capability from another's: after a
    # default run, torch.compile under ATEN_CPU_CAPABILITY=avx2 reused them and computed wrong losses
    # and 1e34 gradients (torch 2.13, Zen 4). One cache per capability.
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))
_MKLDNN = os.environ.get("LLMLAB_TEST_MKLDNN", "1")
if _MKLDNN not in ("0", "1"):
    raise SystemExit(f"LLMLAB_TEST_MKLDNN must be 0 or 1, not {_MKLDNN!r}")
if _MKLDNN == "0":
    import torch

    torch.backends.mkldnn.enabled = False


def pytest_report_header(config):
    import torch

    return (f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
            f"mkldnn enabled: {torch.backends.mkldnn.enabled}")
