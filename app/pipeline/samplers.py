"""The sampler table: public sampler names mapped to diffusers schedulers (pure data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


@dataclass(frozen=True)
class Sampler:
    """A public sampler name bound to a diffusers scheduler class and config overrides."""

    name: str
    scheduler_class: str
    description: str
    overrides: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    stochastic: bool = False


def _sampler(name: str, cls: str, description: str, stochastic: bool = False, **overrides: Any) -> Sampler:
    return Sampler(name, cls, description, MappingProxyType(dict(overrides)), stochastic)


SAMPLERS: MappingProxyType[str, Sampler] = MappingProxyType(
    {
        s.name: s
        for s in (
            _sampler("euler", "EulerDiscreteScheduler", "Euler (k-diffusion style)"),
            _sampler(
                "euler_a",
                "EulerAncestralDiscreteScheduler",
                "Euler ancestral; draws fresh noise every step from the request's CPU generator",
                stochastic=True,
            ),
            _sampler("ddim", "DDIMScheduler", "DDIM, eta 0"),
            _sampler(
                "dpmpp_2m",
                "DPMSolverMultistepScheduler",
                "DPM-Solver++ 2M",
                algorithm_type="dpmsolver++",
                solver_order=2,
                use_karras_sigmas=False,
            ),
            _sampler(
                "dpmpp_2m_karras",
                "DPMSolverMultistepScheduler",
                "DPM-Solver++ 2M with Karras sigmas",
                algorithm_type="dpmsolver++",
                solver_order=2,
                use_karras_sigmas=True,
            ),
            _sampler("pndm", "PNDMScheduler", "PNDM (PLMS), the SD1.5 default", skip_prk_steps=True),
            _sampler("lms", "LMSDiscreteScheduler", "Linear multistep (k-diffusion LMS)"),
            _sampler("heun", "HeunDiscreteScheduler", "Heun (two model calls per step)"),
            _sampler("unipc", "UniPCMultistepScheduler", "UniPC multistep"),
        )
    }
)

SamplerName = Literal[
    "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "lms", "heun", "unipc"
]
