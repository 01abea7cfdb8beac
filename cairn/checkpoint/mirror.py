"""A second home for committed steps: ``--checkpoint.upload_to s3://...`` beside a local folder.

After each local commit the manager hands the step to ``UploadWorker``, whose thread uploads it
(every file checked against the local manifest while it goes up, then the marker) and applies
retention there too. Training never waits for it; ``close`` does, so a run that ends cleanly
leaves every step in both places. Resume takes the newest committed step of either place
(the manager), so a lost machine loses only the steps that had not finished uploading.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

logger = logging.getLogger("cairn")


class UploadWorker:
    """Uploads committed steps of ``local`` to ``remote`` (any store), one at a time, in order."""

    def __init__(self, local, remote, keep_latest_k: int = 0):
        self.local, self.remote, self.keep_latest_k = local, remote, keep_latest_k
        self._queue: queue.Queue = queue.Queue()
        self.uploaded: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._run, name="cairn-upload", daemon=True)
        self._thread.start()

    def request(self, step: int) -> None:
        """Upload step ``step`` once the steps asked for before it are up; returns at once."""
        self._queue.put(step)

    def _run(self) -> None:
        while (step := self._queue.get()) is not None:
            start = time.perf_counter()
            try:
                if step not in self.local.committed_steps():
                    continue  # deleted by retention before its turn came: a newer one follows
                location = self.remote.publish_dir(self.local.step_dir(step), step,
                                                   manifest=self.local.read_manifest(step))
                self.uploaded.append(step)
                logger.info("checkpoint step %d: uploaded to %s in %.1f s", step, location,
                            time.perf_counter() - start)
                if self.keep_latest_k > 0:
                    self.remote.purge(self.keep_latest_k)
            except Exception as e:  # noqa: BLE001 - the local step is committed; the upload is a copy
                self.failed.append((step, str(e)))
                logger.error("checkpoint step %d: upload to %s failed (%s); the step stays committed locally",
                             step, self.remote.url, e)
            finally:
                self._queue.task_done()

    def pending(self) -> set[int]:
        """Steps asked for and not yet uploaded."""
        with self._queue.mutex:
            return {step for step in self._queue.queue if step is not None}

    def wait(self) -> None:
        """Until every step asked for is uploaded (or failed)."""
        self._queue.join()

    def close(self) -> None:
        pending = self._queue.qsize()
        if pending:
            logger.info("waiting for %d checkpoint upload(s) to %s", pending, self.remote.url)
        self._queue.put(None)
        self._thread.join()
