"""What the benchmark, the experiment and the tests share: the main script loaded as a module (the one
way all three run its real code), its main() in a process of its own, and the public transformer configs of the
real SD3 models."""

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "run_onpolicy_distill_colab.py"


def load_distill():
    """The main script, imported as a module; registered in sys.modules, where dataclasses resolve annotations."""
    spec = importlib.util.spec_from_file_location("run_onpolicy_distill_colab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# What a run imports: 5 of a tiny run's 7 s on two CPU cores. A process that has imported them once forks each run.
RUN_IMPORTS = ["torch", "transformers", "accelerate", "peft", "diffusers", "diffusers.models.transformers.transformer_sd3",
               "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3", "distill_module"]


def _main_in_this_process(args: list[str], env: dict, stdout: str, stderr: str) -> None:
    """A run's own process, as `python run_onpolicy_distill_colab.py ARGS` starts: its output, environment,
    sys.argv, Ctrl-C raising KeyboardInterrupt, main()'s return value as the exit code."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = [str(SCRIPT), *args]
    if "OMP_NUM_THREADS" in env:  # read by OpenMP when torch loads: in a forked process it was loaded before
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.exit(load_distill().main(args))


class MainProcess:
    """The main script's main(args) in a process of its own, with Popen's pid, poll, wait, send_signal and
    communicate (the output as text, from files). Without CUDA it is forked from a server that imported RUN_IMPORTS
    once (multiprocessing's forkserver): a run skips most of its start. With CUDA each is a fresh interpreter
    (spawn): there a run's imports are seconds of minutes, and a library touching CUDA as it is imported would break
    every forked run. The environment is set before main() runs: what a library reads when it is imported (HF_HOME,
    HF_ENDPOINT) needs `python run_onpolicy_distill_colab.py` itself."""

    _context = None

    def __init__(self, args: list[str], env: dict | None = None):
        if MainProcess._context is None:  # chosen once per process
            import multiprocessing

            import torch

            if torch.cuda.is_available():
                MainProcess._context = multiprocessing.get_context("spawn")
            else:
                MainProcess._context = multiprocessing.get_context("forkserver")
                MainProcess._context.set_forkserver_preload(RUN_IMPORTS)
        self._folder = tempfile.TemporaryDirectory(prefix="distill-run-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        self.args = list(args)
        self._process = MainProcess._context.Process(target=_main_in_this_process,
                                                     args=(self.args, {**os.environ, **(env or {})}, self._out, self._err))
        self._process.start()
        self.pid = self._process.pid

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig) -> None:
        os.kill(self.pid, sig)

    def communicate(self, timeout=None):
        """(stdout, stderr) once the process has ended; killed first if it is still running after `timeout` s."""
        if self._folder is None:
            return self.output
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.join()
            raise
        finally:
            self.output = tuple(Path(path).read_text(errors="replace") if os.path.exists(path) else ""
                                for path in (self._out, self._err))
            self._folder.cleanup()
            self._folder = None
        return self.output


def run_main_process(args: list[str], env: dict | None = None, timeout=None) -> subprocess.CompletedProcess:
    """MainProcess, waited for: as subprocess.run(capture_output=True, text=True) answers."""
    process = MainProcess(args, env)
    stdout, stderr = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.poll(), stdout, stderr)


# The public transformer/config.json of each model (text length 77 CLIP + 256 T5 tokens, latent /8).
SD3_CONFIGS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "tiny": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                 pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,)),
}


def build_transformer(name: str, dtype, device, **overrides):
    """Random weights of a real architecture (SD3_CONFIGS, with overrides), made directly on the device (seconds)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel.from_config({**SD3_CONFIGS[name], **overrides})
    return model.to(dtype)
