"""Plain diffusers in this process: the baseline the service's latency is compared with."""

from __future__ import annotations

import time
from pathlib import Path


class DirectPipeline:
    """`StableDiffusionPipeline.from_pretrained` of the devicecheck folder on the device, with the worker's settings."""

    def __init__(self, folder: Path, dtype: str, device: str, threads: int) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        from app.pipeline.determinism import configure_torch, torch_device
        from app.pipeline.loader import quiet_libraries

        configure_torch(device, threads, True)  # the settings every worker starts with
        quiet_libraries()
        self.device = torch_device(device)
        self.pipe = StableDiffusionPipeline.from_pretrained(
            folder, dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False,
            use_safetensors=True, local_files_only=True,
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.loose_settings = ""

    def call(self, size: int, steps: int, seed: int) -> float:
        """Seconds for one 1-image call to PIL pixels (CPU noise, as the service draws it)."""
        import torch

        from app.devicecheck.workload import PROMPT

        started = time.perf_counter()
        self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def determinism(self, on: bool) -> None:
        """Switch the determinism settings on (the worker's) or off (library defaults, fastest SDPA)."""
        import torch

        torch.use_deterministic_algorithms(on)
        torch.backends.cudnn.deterministic = on
        torch.backends.cudnn.benchmark = not on
        torch.backends.cuda.matmul.allow_tf32 = not on
        torch.backends.cudnn.allow_tf32 = not on
        if self.device == "cuda":
            torch.backends.cuda.enable_flash_sdp(not on)
            torch.backends.cuda.enable_mem_efficient_sdp(not on)
        self.loose_settings = "" if on else (
            "deterministic algorithms off, cuDNN benchmark on, TF32 on"
            + (", flash and memory-efficient SDPA on" if self.device == "cuda" else ""))

    def close(self) -> None:
        """Drop the pipeline (and its GPU memory)."""
        import gc

        import torch

        self.pipe = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
