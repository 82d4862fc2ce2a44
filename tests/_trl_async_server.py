"""A local stand-in of the vLLM server TRL 1.16's ``AsyncGRPOTrainer`` talks to, and what runs it on CPU.

Imported by ``tests/test_trl_async_e2e.py`` and, through the pickled reward function, by TRL's spawned rollout
child process (so everything the child needs is module level).

* :class:`StandInServer`: an HTTP server in the test process (a thread) serving a tiny causal LM with the endpoints
  TRL calls: ``GET /health``, ``GET /v1/models`` (``max_model_len``), ``POST /v1/completions`` (prompt token ids
  in, sampled ``token_ids`` and their ``logprobs.token_logprobs`` out; replies to some prompts are delayed so groups
  come back late and out of order), ``POST /pause`` / ``/resume`` (TRL's weight-sync pause; completions wait while
  paused), and ``POST /stand_in/weights`` (a state dict, for :class:`HTTPWeightTransfer`).
* :class:`HTTPWeightTransfer`: TRL's ``WeightTransferProtocol`` over that HTTP endpoint. TRL's own
  ``WeightTransferClient`` streams weights over NCCL through vLLM's ``NCCLWeightTransferEngine`` (GPU and vLLM
  only); this keeps TRL's ``_sync_weight`` path (pause, stream every parameter under its vLLM name, resume, bump the
  policy version the worker requests) and replaces only the transport.
* :func:`reference_varlen_attention`: a plain-PyTorch ``flash_attn_varlen_func`` (causal, bottom-right aligned, as
  FlashAttention's) for TRL's tree attention, whose kernel (``kernels-community/flash-attn3``) needs a GPU.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib import request

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

N_TASKS = 8
LATE_LEVEL = 3  # replies to these prompts are delayed: their groups arrive after later chunks' groups


def tasks() -> Dataset:
    """Conversational prompts ``task k`` with ids ``p<k>`` and a level ``k % 4`` that decides the reward."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"task {k}"}] for k in range(N_TASKS)],
            "prompt_id": [f"p{k}" for k in range(N_TASKS)],
            "level": [k % 4 for k in range(N_TASKS)],
        }
    )


def level_reward(completions: list, level: list, **kwargs: Any) -> list[float]:
    """Level 0: always 1; level 1: always 0; levels 2, 3: 1 when the completion's first character is a digit."""
    out = []
    for comp, lv in zip(completions, level):
        text = comp[-1].get("content") or ""
        out.append(1.0 if lv == 0 else 0.0 if lv == 1 else float(bool(text) and text[0].isdigit()))
    return out


# --------------------------------------------------------------------------------------------- attention on CPU
def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    **kwargs: Any,
) -> torch.Tensor:
    """FlashAttention's varlen attention in plain PyTorch: ``q`` ``(Tq, H, D)``, ``k``/``v`` ``(Tk, Hkv, D)``,
    segment ``i`` = queries ``cu_q[i]:cu_q[i+1]`` over keys ``cu_k[i]:cu_k[i+1]``; causal masks are aligned to the
    bottom right (query ``j`` of ``n_q`` sees keys ``0 .. n_k - n_q + j``). Returns ``(Tq, H, D)``."""
    if window_size != (-1, -1):
        raise NotImplementedError("the reference attention has no sliding window")
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:  # grouped-query attention
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi, ki, vi = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)  # (H, n, D)
        scores = (qi @ ki.transpose(-1, -2)).float() * scale  # (H, n_q, n_k)
        if causal:
            n_q, n_k = q1 - q0, k1 - k0
            allowed = torch.arange(n_k)[None, :] <= (torch.arange(n_q)[:, None] + n_k - n_q)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[q0:q1] = (scores.softmax(-1).to(vi.dtype) @ vi).transpose(0, 1)
    return out


def cpu_flash_attn() -> SimpleNamespace:
    """Stand-in for ``trl.experimental.async_grpo.packing._flash_attn()`` (the hub kernel's module)."""
    return SimpleNamespace(flash_attn_varlen_func=reference_varlen_attention)


# --------------------------------------------------------------------------------------------- the server
class StandInServer:
    """The generation server TRL's rollout child calls, serving the tiny model at ``model_dir`` on CPU.

    ``requests``: one ``(prompt text, weight version, arrival time)`` per completion request; ``weight_versions``:
    how many state dicts were loaded; ``pauses``: ``(pause, resume)`` calls.
    """

    def __init__(self, model_dir: str, tokenizer: Any, max_model_len: int = 512, seed: int = 0) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
        self.tok = tokenizer
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        self.requests: list[tuple[str, int, float]] = []
        self.weight_versions = 0
        self.pauses = [0, 0]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> StandInServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Sample up to ``max_tokens`` tokens after ``prompt`` (ids) at ``temperature``; return vLLM's shape."""
        self.running.wait(timeout=60)
        prompt = [int(t) for t in body["prompt"]]
        text = self.tok.decode(prompt)
        late = "task " in text and int(text.rsplit("task ", 1)[1].split("<")[0]) % 4 == LATE_LEVEL
        time.sleep(0.4 if late else 0.01 * self.rng.random())
        gen = torch.Generator().manual_seed(int(body.get("seed", 0)) % (2**31))
        temperature = float(body.get("temperature") or 1.0)
        with self.lock:
            self.requests.append((text, self.weight_versions, time.time()))
            ids = torch.tensor([prompt])
            out: list[int] = []
            logps: list[float] = []
            with torch.no_grad():
                for _ in range(int(body.get("max_tokens") or 8)):
                    logits = self.model(ids).logits[0, -1].float() / temperature
                    logp = torch.log_softmax(logits, -1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=gen))
                    out.append(token)
                    logps.append(float(logp[token]))
                    ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                    if token == self.tok.eos_token_id:
                        break
        return {"choices": [{"token_ids": out, "logprobs": {"token_logprobs": logps}, "text": self.tok.decode(out)}]}

    def load(self, blob: bytes) -> None:
        """Load a state dict sent by :class:`HTTPWeightTransfer` (every parameter, names as the trainer's)."""
        state = torch.load(io.BytesIO(blob), weights_only=True)
        with self.lock:
            _, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"weights do not match the served model: unexpected {unexpected}")
            self.weight_versions += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, payload: dict[str, Any], code: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/health"):
                    self._reply({})
                elif self.path.startswith("/v1/models"):
                    self._reply({"data": [{"id": "stand-in", "max_model_len": server.max_model_len}]})
                else:
                    self._reply({"error": self.path}, 404)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if self.path.startswith("/v1/completions"):
                        self._reply(server.complete(json.loads(body)))
                    elif self.path.startswith("/pause"):
                        server.running.clear()
                        server.pauses[0] += 1
                        self._reply({})
                    elif self.path.startswith("/resume"):
                        server.running.set()
                        server.pauses[1] += 1
                        self._reply({})
                    elif self.path.startswith("/stand_in/weights"):
                        server.load(base64.b64decode(json.loads(body)["state"]))
                        self._reply({})
                    else:
                        self._reply({"error": self.path}, 404)
                except Exception as exc:  # surfaced to the client as an HTTP error
                    self._reply({"error": repr(exc)}, 500)

        return Handler


class HTTPWeightTransfer:
    """TRL's ``WeightTransferProtocol`` over the stand-in's ``/stand_in/weights`` endpoint (see module docstring).

    ``sent``: how many state dicts were sent; ``names``: the parameter names of the last one.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.sent = 0
        self.names: list[str] = []

    def _post(self, path: str, payload: dict[str, Any] | None = None) -> None:
        data = json.dumps(payload or {}).encode()
        req = request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        with request.urlopen(req, timeout=120) as resp:
            if resp.status != 200:
                raise RuntimeError(f"stand-in server answered {resp.status} to {path}")

    def init_weight_transfer(self) -> None:
        with request.urlopen(f"{self.url}/health", timeout=30):
            pass

    def pause(self) -> None:
        self._post("/pause")

    def send_weights(self, iterator: Any) -> None:
        state = {name: tensor.detach().to("cpu").clone() for name, tensor in iterator}
        buf = io.BytesIO()
        torch.save(state, buf)
        self._post("/stand_in/weights", {"state": base64.b64encode(buf.getvalue()).decode()})
        self.sent += 1
        self.names = sorted(state)

    def resume(self) -> None:
        self._post("/resume")

    def destroy(self) -> None:
        pass
