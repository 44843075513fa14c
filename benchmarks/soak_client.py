"""The soak's HTTP client: sends every ``SoakRequest`` to a running SGLang server concurrently
(asyncio + aiohttp) and records what came back, one result dict per request.

Result fields: ``rid``, ``mode``, ``status``, ``n_out`` (output ids received), ``finish`` (finish
reason type, or None), ``chunks`` (stream chunks read), ``t_sent`` / ``t_done`` (client clock,
``time.time()``), ``cached_tokens``, ``num_retractions`` (SGLang's ``meta_info``), ``error``.

``status``: ``ok`` (a non-abort request answered with exactly ``max_new_tokens`` ids and finish
reason ``length``; its ids are kept as ``output_ids``), ``wrong`` (answered otherwise), ``rejected``
(an ``overlong`` request refused with SGLang's input-length error), ``error`` (HTTP error, broken
stream, exception),
``aborted`` (an abort request that ended aborted or was closed by the client), ``finished_first``
(an abort request whose answer was complete before the abort landed; its output is checked like a
non-abort request and is ``wrong`` if it is not complete).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import List, Optional

import aiohttp

from soak_workload import SoakRequest


def _payload(req: SoakRequest, stream: bool) -> dict:
    return {"rid": req.rid, "input_ids": list(req.input_ids), "stream": stream,
            "sampling_params": {"max_new_tokens": req.max_new_tokens, "ignore_eos": True, "temperature": 0.0}}


def _finish_type(meta: dict) -> Optional[str]:
    fr = (meta or {}).get("finish_reason")
    if isinstance(fr, dict):
        return fr.get("type")
    return fr


def _judge_complete(req: SoakRequest, res: dict, meta: dict, out_ids: list) -> None:
    res["n_out"] = len(out_ids)
    res["finish"] = _finish_type(meta)
    res["cached_tokens"] = int((meta or {}).get("cached_tokens") or 0)
    res["num_retractions"] = int((meta or {}).get("num_retractions") or 0)
    complete = res["finish"] == "length" and len(out_ids) == req.max_new_tokens
    if req.aborts:
        res["status"] = "finished_first" if complete else ("aborted" if res["finish"] == "abort" else "wrong")
    else:
        res["status"] = "ok" if complete else "wrong"
    if complete:
        res["output_ids"] = list(out_ids)
    if res["status"] == "wrong":
        res["error"] = f"got {len(out_ids)} of {req.max_new_tokens} ids, finish reason {meta.get('finish_reason')!r}"


async def _abort(session: aiohttp.ClientSession, url: str, rid: str) -> None:
    async with session.post(url + "/abort_request", json={"rid": rid}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"/abort_request {rid}: HTTP {r.status}")


async def _plain(session, url, req: SoakRequest, res: dict) -> None:
    abort_task = None
    if req.mode == "abort_queued":
        async def later():
            await asyncio.sleep(req.abort_after / 1000.0)
            await _abort(session, url, req.rid)
        abort_task = asyncio.ensure_future(later())
    async with session.post(url + "/generate", json=_payload(req, False)) as r:
        body = await r.read()
    if abort_task is not None:
        await abort_task
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        data = None
    if req.mode == "overlong":
        text = body[:400].decode(errors="replace")
        ok = r.status == 400 and "exceeds the maximum allowed length" in text
        res["status"], res["error"] = ("rejected", None) if ok else ("wrong", f"HTTP {r.status}: {text}")
        return
    if r.status != 200 or not isinstance(data, dict) or "output_ids" not in data:
        meta = (data or {}).get("meta_info", {}) if isinstance(data, dict) else {}
        if req.mode == "abort_queued" and _finish_type(meta) == "abort":
            res["status"], res["finish"] = "aborted", "abort"
            return
        err = body[:300].decode(errors="replace")
        if req.mode == "abort_queued" and r.status == 400 and "abort" in err.lower():
            res["status"], res["finish"] = "aborted", "abort"  # SGLang answers an aborted request with an error body
            return
        res["status"], res["error"] = "error", f"HTTP {r.status}: {err}"
        return
    _judge_complete(req, res, data.get("meta_info", {}), data["output_ids"])


async def _stream(session, url, req: SoakRequest, res: dict) -> None:
    last, prev_ids = None, []
    async with session.post(url + "/generate", json=_payload(req, True)) as r:
        if r.status != 200:
            res["status"], res["error"] = "error", f"HTTP {r.status}: {(await r.read())[:300]!r}"
            return
        async for raw in r.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res["status"], res["error"] = "error", f"stream error: {chunk['error']}"
                return
            ids = chunk.get("output_ids", [])
            if ids[: len(prev_ids)] != prev_ids:
                res["status"], res["error"] = "wrong", f"chunk {res['chunks']} does not extend the previous output"
                return
            prev_ids, last = ids, chunk
            res["chunks"] += 1
            if req.mode in ("abort_close", "abort_api") and res["chunks"] == req.abort_after \
                    and _finish_type(chunk.get("meta_info")) is None:
                if req.mode == "abort_close":
                    r.close()  # drop the connection mid-stream
                    res["status"], res["n_out"] = "aborted", len(ids)
                    return
                await _abort(session, url, req.rid)
    if last is None:
        res["status"], res["error"] = "error", "stream ended without a chunk"
        return
    _judge_complete(req, res, last.get("meta_info", {}), prev_ids)


async def _one(session, url, req: SoakRequest, sem: Optional[asyncio.Semaphore], delay: float) -> dict:
    res = {"rid": req.rid, "mode": req.mode, "status": None, "n_out": 0, "finish": None, "chunks": 0,
           "t_sent": None, "t_done": None, "cached_tokens": 0, "num_retractions": 0, "error": None}
    if delay > 0:
        await asyncio.sleep(delay)
    if sem is not None:
        await sem.acquire()
    try:
        res["t_sent"] = time.time()
        if req.mode in ("plain", "abort_queued", "overlong"):
            await _plain(session, url, req, res)
        else:
            await _stream(session, url, req, res)
    except Exception as exc:  # noqa: BLE001 - every failure is a result, judged by the caller
        res["status"], res["error"] = "error", f"{type(exc).__name__}: {exc}"
    finally:
        res["t_done"] = time.time()
        if sem is not None:
            sem.release()
    return res


async def send_all(url: str, requests: List[SoakRequest], *, max_concurrency: int = 0, request_rate: float = 0.0,
                   timeout_s: float = 3600.0, seed: int = 0) -> List[dict]:
    """Send all requests; ``max_concurrency`` 0 = all at once; ``request_rate`` > 0 = Poisson arrivals
    at that many requests/s (0 = all at t=0)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    rng = random.Random(seed + 1)
    delays, t = [], 0.0
    for _ in requests:
        delays.append(t)
        if request_rate > 0:
            t += rng.expovariate(request_rate)
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        return await asyncio.gather(*(_one(session, url, r, sem, d) for r, d in zip(requests, delays)))
