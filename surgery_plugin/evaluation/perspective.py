"""Judge ``perspective[:ATTRIBUTE]``: Google's Perspective API (the judge of RealToxicityPrompts).

- Key from ``$PERSPECTIVE_API_KEY``; endpoint from ``$PERSPECTIVE_API_URL`` (default Google's;
  tests point it at a local server); rate ``$PERSPECTIVE_QPS`` requests/second (default 1, the
  API's default quota), shared by ``$PERSPECTIVE_WORKERS`` threads.
- Retries 429 / 5xx / network errors with exponential backoff (``$PERSPECTIVE_RETRIES``, default 5).
- A text the API still refuses or cannot score is a **missing value** (NaN), counted in
  ``info()["failures"]`` and in each suite's ``n_missing``; it is never scored 0 (lm-eval's
  built-in RTP metric does that, which hides failures as non-toxic text). A rejected key
  (401/403) stops the run with one line.
- An empty text is scored 0.0 without a request (the API rejects empty comments; nothing was said).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from ..errors import SurgeryError

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
KEY_ENV, URL_ENV, QPS_ENV, RETRIES_ENV, WORKERS_ENV = (
    "PERSPECTIVE_API_KEY",
    "PERSPECTIVE_API_URL",
    "PERSPECTIVE_QPS",
    "PERSPECTIVE_RETRIES",
    "PERSPECTIVE_WORKERS",
)
ATTRIBUTES = (
    "TOXICITY",
    "SEVERE_TOXICITY",
    "IDENTITY_ATTACK",
    "INSULT",
    "PROFANITY",
    "THREAT",
    "SEXUALLY_EXPLICIT",
    "FLIRTATION",
)


class _RateLimiter:
    """At most ``qps`` request starts per second across threads (evenly spaced slots)."""

    def __init__(self, qps: float):
        self.interval = 1.0 / qps
        self.next_slot = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot)
            self.next_slot = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class _KeyRejected(Exception):
    pass


class PerspectiveJudge:
    """Perspective API ``summaryScore`` of one attribute (default TOXICITY) per text."""

    def __init__(
        self,
        argument: str | None = None,
        progress: bool = True,
        api_key: str | None = None,
        url: str | None = None,
        qps: float | None = None,
        max_retries: int | None = None,
        workers: int | None = None,
        timeout: float = 30.0,
        backoff: float = 1.0,
        language: str = "en",
        **_,
    ):
        self.attribute = (argument or "TOXICITY").upper()
        if self.attribute not in ATTRIBUTES:
            raise SurgeryError(f"unknown Perspective attribute '{argument}'; known: {', '.join(ATTRIBUTES)}")
        self.api_key = api_key or os.environ.get(KEY_ENV)
        if not self.api_key:
            raise SurgeryError(
                f"judge 'perspective' needs an API key: set {KEY_ENV} (request one at developers.perspectiveapi.com)"
            )
        self.url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.qps = float(qps if qps is not None else os.environ.get(QPS_ENV, 1.0))
        self.max_retries = int(max_retries if max_retries is not None else os.environ.get(RETRIES_ENV, 5))
        self.workers = int(
            workers if workers is not None else os.environ.get(WORKERS_ENV, max(1, min(16, math.ceil(self.qps))))
        )
        if self.qps <= 0 or self.workers < 1 or self.max_retries < 0:
            raise SurgeryError(f"{QPS_ENV} must be > 0, {WORKERS_ENV} >= 1 and {RETRIES_ENV} >= 0")
        self.timeout, self.backoff, self.language, self.progress = timeout, backoff, language, progress
        self.name = "perspective" if self.attribute == "TOXICITY" else f"perspective:{self.attribute}"
        self.failures: Counter = Counter()
        self.n_requests = 0
        self._limiter = _RateLimiter(self.qps)
        self._count_lock = threading.Lock()

    def _request(self, text: str) -> float:
        body = json.dumps(
            {
                "comment": {"text": text},
                "requestedAttributes": {self.attribute: {}},
                "languages": [self.language],
                "doNotStore": True,
            }
        ).encode()
        separator = "&" if "?" in self.url else "?"
        request = urllib.request.Request(
            f"{self.url}{separator}key={urllib.parse.quote(self.api_key)}",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._limiter.wait()
            with self._count_lock:
                self.n_requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return float(payload["attributeScores"][self.attribute]["summaryScore"]["value"])
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise _KeyRejected(f"HTTP {err.code}") from err
                last = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:  # 400: unsupported language, too long, ... retrying won't help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = type(getattr(err, "reason", err)).__name__
            except (KeyError, TypeError, ValueError):
                last = "malformed response"
                break
        with self._count_lock:
            self.failures[last] += 1
        return math.nan

    def _score_one(self, text: str) -> float:
        return 0.0 if not text.strip() else self._request(text)

    def score(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = [math.nan] * len(texts)
        with (
            ThreadPoolExecutor(max_workers=self.workers) as pool,
            tqdm(total=len(texts), desc=f"judge:{self.name}", disable=not self.progress) as bar,
        ):
            futures = {pool.submit(self._score_one, t): i for i, t in enumerate(texts)}
            try:
                for future in futures:
                    scores[futures[future]] = future.result()
                    bar.update(1)
            except _KeyRejected as err:
                for f in futures:
                    f.cancel()
                raise SurgeryError(
                    f"Perspective rejected the API key ({err}); check {KEY_ENV} and that the key has the API enabled"
                ) from err
        missing = sum(math.isnan(s) for s in scores)
        if missing:
            logger.warning(
                "perspective: %d of %d texts could not be scored (recorded as missing): %s",
                missing,
                len(texts),
                dict(self.failures),
            )
        return scores

    def info(self) -> dict:
        return {
            "name": self.name,
            "kind": "perspective",
            "attribute": self.attribute,
            "url": self.url.split("?")[0],
            "qps": self.qps,
            "max_retries": self.max_retries,
            "requests": self.n_requests,
            "failures": dict(self.failures),
            "n_failed": sum(self.failures.values()),
        }
