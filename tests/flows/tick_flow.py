"""The smallest real flow: two steps and one artifact, the write load of the Metaflow soak."""

from metaflow import FlowSpec, step


class TickFlow(FlowSpec):
    @step
    def start(self):
        self.tick = 1
        self.next(self.end)

    @step
    def end(self):
        print(f"tick {self.tick}")


if __name__ == "__main__":
    TickFlow()
