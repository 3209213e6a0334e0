"""Step 1b: recovery data: the expert with mistakes injected on purpose, then recovering.

    python collect_recovery_data.py                      # small preset -> ./data_recovery/*.npz
    python collect_recovery_data.py --preset full        # the seed's ~2.4M frames

Mistakes (codes in data_loader.MISTAKES, recorded per frame in `mistake`): understeer, oversteer,
late braking into a corner, throttle/brake panic, bursts of steering lock. Between mistakes, and
right after each one, the expert drives and brings the car back. Re-running resumes.
"""
import numpy as np

from carenv import Expert
from collection import collector_parser, run_collection
from data_loader import MISTAKES
from presets import CONTROL_PERIOD

CODES = {name: code for code, name in MISTAKES.items()}


class MistakeExpert(Expert):
    """The expert, with a mistake every `gap_s` seconds on average, each lasting 0.4 to `max_len_s` s."""

    def __init__(self, gap_s: float = 2.5, max_len_s: float = 1.4, period_s: float = CONTROL_PERIOD / 50, **expert_kwargs):
        super().__init__(**expert_kwargs)
        self.gap, self.max_len, self.period = gap_s / period_s, max_len_s / period_s, period_s

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.rng = rng
        self.kind, self.left = 0, 0
        self.wait = int(rng.exponential(self.gap)) + 1

    def _start(self) -> None:
        self.kind = int(self.rng.integers(1, len(MISTAKES)))
        self.left = int(self.rng.integers(int(0.4 / self.period), int(self.max_len) + 1))
        self.side = float(self.rng.choice([-1.0, 1.0]))

    def act(self, frame, sim):
        action, _ = super().act(frame, sim)
        if self.left == 0:
            self.kind = 0
            self.wait -= 1
            if self.wait <= 0:
                self._start()
                self.wait = int(self.rng.exponential(self.gap)) + 1
        if self.kind:
            self.left -= 1
            action = self._mistake(action)
        return action, {"mistake": np.int8(self.kind)}          # the episode format's int8 column

    def _mistake(self, a: np.ndarray) -> np.ndarray:
        steer, gas, brake = float(a[0]), float(a[1]), float(a[2])
        kind = MISTAKES[self.kind]
        if kind == "understeer":                    # turns in far too little, keeps the throttle
            steer, gas, brake = 0.25 * steer, max(gas, 0.6), 0.0
        elif kind == "oversteer":                   # too much lock and power
            steer, gas, brake = np.clip(2.5 * steer + 0.3 * self.side, -1, 1), 1.0, 0.0
        elif kind == "late_brake":                  # no braking at all, flat out into whatever comes
            gas, brake = 1.0, 0.0
        elif kind == "panic":                       # stamps on pedals at random, jerks the wheel
            if self.rng.random() < 0.5:
                gas, brake = 1.0, 0.0
            else:
                gas, brake = 0.0, 1.0
            steer = float(np.clip(steer + self.rng.normal(0, 0.6), -1, 1))
        elif kind == "steer_lock":                  # full lock to one side
            steer = self.side
        return np.array([steer, gas, brake], np.float32)


def main(args):
    return run_collection("recovery", MistakeExpert, args)


if __name__ == "__main__":
    main(collector_parser("recovery", __doc__.splitlines()[0]).parse_args())
