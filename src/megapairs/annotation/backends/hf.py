"""The `hf` backend: local transformers models answer the requests, in batches.

- describer: an image-text-to-text checkpoint (`AutoProcessor` +
  `AutoModelForImageTextToText`: LLaVA-NeXT, Qwen2-VL, InternVL-hf, ...);
- instructor: a causal LM (`AutoTokenizer` + `AutoModelForCausalLM`).

`EndpointConfig.model` is a hub name or a local folder; `device` / `dtype` as the
encoders read them (`auto`: cuda + float16 when present, else cpu + float32), checked
when the backend is built; `max_tokens`, `temperature`, `top_p` and `batch_size` apply;
`base_url`, `api_key_env`, `timeout`, `extra_body`, `cooldown` and `cooldown_max` are
the openai backend's.

Each role's model loads lazily, in a worker thread, on that role's first request: a run
whose describer answers are all cached never loads the VLM. A model that does not load
raises `RuntimeError` naming the path from `complete` (a setup problem, not a pair's).
Models stay loaded until the backend is dropped; `aclose` only stops the batchers, so
the stage may call `asyncio.run` once per part with one backend.

Batching: `complete` queues the request for its role's micro-batcher, a task of the
running event loop that takes up to `batch_size` waiting requests (waiting at most
`max_wait_s` after the first for more) and runs one `generate` over them in a worker
thread. Roles never share a batch. Prompts are left-padded. When a batch fails, each of
its requests is retried alone, so one bad request (an undecodable image, a prompt the
chat template refuses) fails only itself, with `BackendError("model_error")`; a
well-formed but empty answer is `BackendError("empty_response")`.

Decoding: greedy when `temperature == 0`; otherwise sampling with `temperature` and
`top_p`, the torch RNG seeded from the *first* request's seed of each batch (under a
process-wide lock), so a sampled answer is reproducible for the same batch composition
only. Only the new tokens are decoded, special tokens skipped, whitespace stripped.

Prompts go through the checkpoint's chat template (`add_generation_prompt=True`);
a tokenizer or processor without one gets a plain rendering: one `"role: text"` line
per message (an image as the processor's image token) and a final `"assistant:"`.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from megapairs.annotation.backends.base import BACKENDS, ROLES
from megapairs.annotation.types import (
    BackendError,
    ChatMessage,
    Completion,
    ImagePart,
    PromptRequest,
    Role,
    TextPart,
)
from megapairs.config import AnnotateConfig, EndpointConfig

if TYPE_CHECKING:
    import torch

MAX_WAIT_S = 0.005  # how long a batch waits after its first request for more
DETAIL_CHARS = 500  # an error's detail is cut to this length
_SAMPLING_LOCK = threading.Lock()  # torch's RNG is process-wide: one seeded generate at a time
_LOAD_LOCK = threading.Lock()  # transformers' lazy imports are not thread-safe: one load at a time

Answer = str | BackendError


# messages -> model inputs ------------------------------------------------------------


def decode_image(part: ImagePart) -> Image.Image:
    with Image.open(io.BytesIO(part.data)) as image:
        return image.convert("RGB")


def vision_chat(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """Messages as transformers' multimodal chat format: lists of text / image parts."""
    return [
        {"role": message.role, "content": [_vision_part(part) for part in message.parts]}
        for message in messages
    ]


def _vision_part(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        return {"type": "image", "image": decode_image(part)}
    return {"type": "text", "text": part.text}


def text_chat(messages: tuple[ChatMessage, ...]) -> list[dict[str, str]]:
    """Messages as plain-string chat turns."""
    return [{"role": message.role, "content": message.text} for message in _text_only(messages)]


def _text_only(messages: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    if any(isinstance(part, ImagePart) for m in messages for part in m.parts):
        raise ValueError("the instructor is a text-only model but the request holds images")
    return messages


def plain_prompt(messages: tuple[ChatMessage, ...], image_token: str = "") -> str:
    """The fallback rendering for checkpoints without a chat template."""
    lines = []
    for message in messages:
        text = "".join(
            image_token if isinstance(part, ImagePart) else part.text for part in message.parts
        )
        lines.append(f"{message.role}: {text}")
    return "\n".join([*lines, "assistant:"])


# one role's model ----------------------------------------------------------------------


@dataclass
class LocalModel:
    """One role's checkpoint, loaded on first use; `generate` answers a batch."""

    role: Role
    endpoint: EndpointConfig
    vision: bool  # image-text-to-text (describer) or causal LM (instructor)
    device: torch.device
    dtype: torch.dtype
    batch_sizes: Counter[int] = field(default_factory=Counter)  # size -> generate calls
    model: Any = field(default=None, init=False)  # None until loaded
    processor: Any = field(default=None, init=False)  # a processor (vision) or a tokenizer
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def for_role(cls, role: Role, endpoint: EndpointConfig, vision: bool) -> LocalModel:
        """Check the endpoint's model, device and dtype now; load later."""
        from megapairs.encoders.base import resolve_device, resolve_dtype  # torch: when used

        if not endpoint.model:
            raise ValueError(f"annotate.{role}.model is empty: give a hub name or a folder")
        device = resolve_device(endpoint.device, setting=f"annotate.{role}.device")
        dtype = resolve_dtype(endpoint.dtype, device)  # the config allows known dtypes only
        return cls(role, endpoint, vision, device, dtype)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer if self.vision else self.processor

    def load(self) -> None:
        """Load processor and model once; `RuntimeError` naming the path when they do not."""
        with _LOAD_LOCK:
            if self.model is None:
                self.processor, self.model = self._from_pretrained()
                self._prepare_tokenizer()

    def _from_pretrained(self) -> tuple[Any, Any]:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        path, kind = self.endpoint.model, "image-text-to-text" if self.vision else "causal LM"
        processor_class = AutoProcessor if self.vision else AutoTokenizer
        model_class = AutoModelForImageTextToText if self.vision else AutoModelForCausalLM
        try:
            processor = processor_class.from_pretrained(path)
            if self.vision and not hasattr(processor, "image_processor"):
                raise ValueError(f"{type(processor).__name__} is not a multimodal processor")
            model = model_class.from_pretrained(path, dtype=self.dtype, device_map=str(self.device))
        except Exception as err:  # OSError, ValueError, ...: all mean "not loadable here"
            raise RuntimeError(
                f"annotate.{self.role}.model {path!r} did not load as a {kind} checkpoint: "
                f"{type(err).__name__}: {err}. It must be a local checkpoint folder or a hub "
                "name that is cached or reachable (offline runs cannot download)."
            ) from err
        return processor, model.eval()

    def _prepare_tokenizer(self) -> None:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # decoder-only generation continues the last column
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def generate(self, requests: list[PromptRequest]) -> list[Answer]:
        """Answer a batch; when it fails, answer each request alone."""
        self.load()
        try:
            texts = self._generate(requests)
        except Exception as err:
            if len(requests) == 1:
                return [BackendError("model_error", _detail(err))]
            return [answer for request in requests for answer in self.generate([request])]
        return [_checked(text) for text in texts]

    def _generate(self, requests: list[PromptRequest]) -> list[str]:
        with self._lock:
            self.batch_sizes[len(requests)] += 1
            inputs = self._encode(requests).to(self.model.device)
            sample = self.endpoint.temperature > 0
            sampling = {"temperature": self.endpoint.temperature, "top_p": self.endpoint.top_p}
            with _seeded(requests[0].seed) if sample else nullcontext():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=self.endpoint.max_tokens,
                    do_sample=sample,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **(sampling if sample else {}),
                )
        if not self.model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    def _encode(self, requests: list[PromptRequest]) -> Any:
        if self.processor.chat_template is None:
            return self._encode_plain(requests)
        chats: list[Any] = [
            vision_chat(r.messages) if self.vision else text_chat(r.messages) for r in requests
        ]
        template = {"add_generation_prompt": True, "tokenize": True, "return_dict": True}
        if self.vision:
            inputs = self.processor.apply_chat_template(
                chats, **template, return_tensors="pt", processor_kwargs={"padding": True}
            )
            return inputs.to(dtype=self.dtype)  # pixel values in the model's dtype
        return self.processor.apply_chat_template(
            chats, **template, return_tensors="pt", padding=True
        )

    def _encode_plain(self, requests: list[PromptRequest]) -> Any:
        if not self.vision:
            prompts = [plain_prompt(_text_only(r.messages)) for r in requests]
            return self.processor(prompts, return_tensors="pt", padding=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        prompts = [plain_prompt(r.messages, image_token) for r in requests]
        images = [
            decode_image(part)
            for r in requests
            for m in r.messages
            for part in m.parts
            if isinstance(part, ImagePart)
        ]
        inputs = self.processor(
            text=prompts, images=images or None, return_tensors="pt", padding=True
        )
        return inputs.to(dtype=self.dtype)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with _SAMPLING_LOCK:
        torch.manual_seed(seed % 2**63)
        yield


def _checked(text: str) -> Answer:
    text = text.strip()
    return text if text else BackendError("empty_response", "the model generated no text")


def _detail(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:DETAIL_CHARS]


# batching ------------------------------------------------------------------------------


@dataclass
class _Job:
    request: PromptRequest
    future: asyncio.Future[Completion]


class MicroBatcher:
    """Collects concurrent requests into batches for a blocking `run`, one batch at a time.

    Lives in one event loop: the queue and its task are made on the first `submit` of a
    loop and made anew when a later `asyncio.run` brings another loop.
    """

    def __init__(
        self,
        run: Callable[[list[PromptRequest]], list[Answer]],
        batch_size: int,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.run = run
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, request: PromptRequest) -> Completion:
        loop = asyncio.get_running_loop()
        task = self._task
        if self._queue is None or task is None or task.get_loop() is not loop or task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._serve(self._queue))
        job = _Job(request, loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def aclose(self) -> None:
        """Stop the batcher task and cancel the requests still queued."""
        task, queue = self._task, self._queue
        self._task = self._queue = None
        if task is None or queue is None or task.get_loop() is not asyncio.get_running_loop():
            return  # never started, or its event loop has ended (and cancelled it)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while not queue.empty():
            queue.get_nowait().future.cancel()

    async def _serve(self, queue: asyncio.Queue[_Job]) -> None:
        while True:
            jobs = [job for job in await self._next_batch(queue) if not job.future.done()]
            if not jobs:
                continue
            try:
                answers = await asyncio.to_thread(self.run, [job.request for job in jobs])
            except asyncio.CancelledError:  # closed mid-batch: its callers stop waiting too
                for job in jobs:
                    job.future.cancel()
                raise
            except Exception as err:  # a setup error (the model did not load): every caller's
                for job in jobs:
                    _resolve(job.future, err)
                continue
            for job, answer in zip(jobs, answers, strict=True):
                _resolve(job.future, answer)

    async def _next_batch(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch


def _resolve(future: asyncio.Future[Completion], answer: Answer | Exception) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(Completion(text=answer))


# the backend -----------------------------------------------------------------------------


class HFBackend:
    """Local transformers models for both roles, each behind its own micro-batcher."""

    name = "hf"
    reads_images = True

    def __init__(
        self,
        config: AnnotateConfig,
        max_wait_s: float = MAX_WAIT_S,
        roles: tuple[Role, ...] = ROLES,
    ) -> None:
        self.models: dict[Role, LocalModel] = {
            role: LocalModel.for_role(role, getattr(config, role), vision=role == "describer")
            for role in roles
        }
        self._batchers: dict[Role, MicroBatcher] = {
            role: MicroBatcher(model.generate, model.endpoint.batch_size, max_wait_s)
            for role, model in self.models.items()
        }

    def model_name(self, role: Role) -> str:
        return self.models[role].endpoint.model

    def check_ready(self) -> None:
        """Settings were checked when built; each model loads on its role's first request
        (a run whose answers are all cached loads none), and one that fails stops the run."""

    async def complete(self, request: PromptRequest) -> Completion:
        return await self._batchers[request.role].submit(request)

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()


@BACKENDS.register("hf")
def build_hf_backend(config: AnnotateConfig, roles: tuple[Role, ...] = ROLES) -> HFBackend:
    return HFBackend(config, roles=roles)
