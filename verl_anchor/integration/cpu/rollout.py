"""An "hf" rollout for verl 0.9.1: Hugging Face `generate` behind verl's async server protocol.

verl 0.9.1 only ships vLLM/SGLang/TRT-LLM rollout servers, none of which runs on a CPU-only
machine. This module provides the three pieces verl's hybrid (colocated) rollout needs:

- `HFServer`: the server, a Ray actor holding an fp32 copy of the policy. `generate` takes
  token ids and returns a `TokenOutput` with the sampled tokens (stopping at eos) and their
  log-probs; `load_weights` receives the actor's weights, which verl pushes every step.
- `HFReplica`: the `RolloutReplica` the trainer's `LLMServerManager` creates; it launches one
  named `HFServer` per replica.
- `HFServerAdapter`: the `BaseRollout` living inside the hybrid actor worker; verl calls its
  `update_weights` with the FSDP weights, which it forwards to the server.

A smoke/integration path: requests are served one at a time, there is no KV-cache management,
and LoRA adapters are not synced (use `lora.merge=True`). Only the hybrid mode is supported.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import Any

import ray
import torch
from transformers import AutoModelForCausalLM

from verl_anchor.integration.verl_api import BaseRollout, RolloutMode, RolloutReplica, TokenOutput

__all__ = ["HFReplica", "HFServer", "HFServerAdapter", "server_name"]

logger = logging.getLogger(__name__)

_ATTN_ON_CPU = ("eager", "sdpa")


def server_name(replica_rank: int) -> str:
    """Ray actor name of the server of policy replica `replica_rank` (one node per replica)."""
    return f"hf_server_{replica_rank}_0"


class HFServer:
    """Token-in/token-out generation with `transformers`, one request at a time.

    Wrapped with `ray.remote` by `HFReplica`; also usable in-process (tests).
    """

    def __init__(
        self,
        model_path: str,
        *,
        prompt_length: int,
        response_length: int,
        max_model_len: int | None = None,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=attn_implementation
        ).eval()
        gen = self.model.generation_config  # generation_config.json, else derived from config.json
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else self.eos_token_ids[0]
        self.prompt_length = prompt_length
        self.response_length = response_length
        self.max_model_len = max_model_len or prompt_length + response_length
        self.global_steps: int | None = None  # the weight version, reported with every response
        # One request at a time, and never while weights are being replaced.
        self._lock = asyncio.Lock()
        torch.manual_seed(seed)  # HF sampling draws from the global RNG (the actor's own process)

    def _max_new_tokens(self, sampling_params: dict[str, Any], num_prompt_tokens: int) -> int:
        # Same budget rules as verl's vLLM server (vllm_async_server.py, generate).
        budget = self.max_model_len - num_prompt_tokens
        if budget < 1:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens leaves no room within {self.max_model_len}")
        requested = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
        if requested is None:
            requested = min(self.response_length, self.prompt_length + self.response_length - num_prompt_tokens)
        return max(1, min(int(requested), budget))

    @torch.no_grad()
    def _generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> tuple[list[int], list[float]]:
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        temperature = float(sampling_params.get("temperature", 1.0))
        do_sample = temperature > 0
        kwargs: dict[str, Any] = {}
        if do_sample:
            top_k = int(sampling_params.get("top_k", -1))
            kwargs = dict(
                temperature=temperature,
                top_p=float(sampling_params.get("top_p", 1.0)),
                top_k=top_k if top_k > 0 else 0,  # verl's -1 means "off"; HF's off is 0
            )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self._max_new_tokens(sampling_params, len(prompt_ids)),
            do_sample=do_sample,
            repetition_penalty=float(sampling_params.get("repetition_penalty", 1.0)),
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        tokens = out.sequences[0, input_ids.shape[1] :]
        # Raw logits (before top-k/top-p), scaled like verl's actor scales them when it
        # recomputes old log-probs, so rollout and actor log-probs are comparable.
        logits = torch.cat(out.logits, dim=0).float() / (temperature if do_sample else 1.0)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens.tolist(), log_probs.tolist()

    async def generate(
        self,
        request_id: str | None = None,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample a response to `prompt_ids` (the call verl's `LLMServerClient` makes)."""
        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError("the hf rollout is text-only")
        async with self._lock:
            token_ids, log_probs = await asyncio.to_thread(self._generate, list(prompt_ids), dict(sampling_params))
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def load_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> None:
        """Replace the weights with the actor's (HF parameter names, full tensors)."""
        async with self._lock:
            result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"weights not in the rollout model: {result.unexpected_keys[:8]}")
        if result.missing_keys:
            missing = result.missing_keys
            logger.warning("hf rollout: %d weights not synced, e.g. %s", len(missing), missing[:4])
        if global_steps is not None:
            self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # Memory and scheduling controls verl sends to every server: nothing to do for HF generate.
    async def wake_up(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def sleep(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        pass

    async def resume_generation(self) -> None:
        pass

    async def clear_kv_cache(self) -> None:
        pass

    async def release_kv_cache(self) -> None:
        pass

    async def resume_kv_cache(self) -> None:
        pass

    async def start_profile(self, **kwargs: Any) -> None:
        pass

    async def stop_profile(self) -> None:
        pass


class HFReplica(RolloutReplica):
    """One `HFServer` per replica, next to the hybrid actor workers (hybrid mode only)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(f"the hf rollout supports the hybrid mode only, not {self.rollout_mode}")
        if self.is_reward_model or self.is_teacher_model:
            raise NotImplementedError("the hf rollout serves the policy only")
        attn = self.model_config.get("override_config", {}).get("attn_implementation", "sdpa")
        name = server_name(self.replica_rank)
        server = (
            ray.remote(HFServer)
            .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(
                self.model_config.path,  # the DictConfig of actor_rollout_ref.model: no local_path
                prompt_length=self.config.prompt_length,
                response_length=self.config.response_length,
                max_model_len=self.config.max_model_len,
                attn_implementation=attn if attn in _ATTN_ON_CPU else "sdpa",
                seed=self.config.seed + self.replica_rank,
            )
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf://{name}"


class HFServerAdapter(BaseRollout):
    """The rollout inside the hybrid actor worker: forwards weight updates to its server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        per_replica = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
        self._has_server = rank % per_replica == 0
        self._server: ray.actor.ActorHandle | None = None  # looked up lazily: launched after us
        # Level 1 = weights stay resident; read by verl's LoRA path (engine_workers.update_weights).
        self.sleep_level = 1

    async def resume(self, tags: list[str]) -> None:
        pass

    async def release(self) -> None:
        pass

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        """Send the actor's weights to this replica's server (verl calls this every step)."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf rollout takes named tensors, not {wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError("the hf rollout cannot load LoRA adapters; set model.lora.merge=True")
        # Every rank drains the generator: with FSDP each item is an all-gather (a collective).
        state = {name: tensor.detach().to("cpu") for name, tensor in weights}
        if self._has_server:
            if self._server is None:
                self._server = ray.get_actor(server_name(self.replica_rank))
            await self._server.load_weights.remote(state, global_steps)
