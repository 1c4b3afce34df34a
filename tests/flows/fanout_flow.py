"""A small flow with a foreach and a join, used by the end-to-end tests."""

from metaflow import FlowSpec, step


class FanoutFlow(FlowSpec):
    @step
    def start(self):
        self.numbers = [1, 2, 3]
        self.next(self.square, foreach="numbers")

    @step
    def square(self):
        self.value = self.input * self.input
        print(f"squared {self.input} -> {self.value}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(branch.value for branch in inputs)
        self.next(self.end)

    @step
    def end(self):
        print(f"total is {self.total}")


if __name__ == "__main__":
    FanoutFlow()
