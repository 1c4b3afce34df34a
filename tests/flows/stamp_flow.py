"""A foreach flow whose every task writes an artifact and a log line unique to its run, so that one
run's objects in the store can be lost without touching another's."""

from metaflow import FlowSpec, current, step


class StampFlow(FlowSpec):
    @step
    def start(self):
        self.stamp = f"run {current.run_id}"
        self.items = [1, 2]
        self.next(self.part, foreach="items")

    @step
    def part(self):
        self.piece = f"{current.run_id}/{self.input}"
        print(f"piece {self.piece}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.pieces = sorted(branch.piece for branch in inputs)
        self.merge_artifacts(inputs, include=["stamp"])
        self.next(self.end)

    @step
    def end(self):
        print(f"stamp {self.stamp}")


if __name__ == "__main__":
    StampFlow()
