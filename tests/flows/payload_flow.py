"""A foreach flow whose every task stores about 200 KB that nothing can compress, and a log line
naming its run: the write load of the persistence driver (scripts/torture.py)."""

import hashlib
import os

from metaflow import FlowSpec, current, step

PAYLOAD_BYTES = 200 * 1024


class PayloadFlow(FlowSpec):
    @step
    def start(self):
        self.blob = os.urandom(PAYLOAD_BYTES)
        self.items = [1, 2]
        print(f"payload run {current.run_id} starts")
        self.next(self.part, foreach="items")

    @step
    def part(self):
        self.blob = os.urandom(PAYLOAD_BYTES)
        self.digest = hashlib.sha256(self.blob).hexdigest()
        print(f"payload {current.run_id}/{self.input} {self.digest}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.digests = sorted(branch.digest for branch in inputs)
        self.blob = os.urandom(PAYLOAD_BYTES)
        print(f"payload run {current.run_id} joined {len(self.digests)} parts")
        self.next(self.end)

    @step
    def end(self):
        print(f"payload run {current.run_id} done")


if __name__ == "__main__":
    PayloadFlow()
