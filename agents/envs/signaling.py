"""The Lewis referential (signalling) game in text, for two agents: `speaker` and `listener`.

One episode is two steps:
    step 1  the speaker sees the target object and writes a short message (any text; cleaned and cut
            to `message_chars` characters); the listener waits.
    step 2  the listener sees the message and the candidates and names one; the speaker waits.
            Both get the shared reward 1 when the named candidate is the target, else 0.

Observations (exact text):
    speaker   "Object: {target}"
    listener  "Message: {message}\\nCandidates: {c1}, {c2}, ..."   (order drawn per episode when
              shuffle=True, else the objects' order)
    waiting   "Wait."

Parsing the listener's answer: lower-cased, every character that is not an ASCII letter or digit is a
space, split into words; the choice is the one candidate whose name occurs among the words ("the
kite.", "I pick kite" and "KITE" all name kite). No candidate named, or several ("kite or egg"), is
an invalid action (reward 0, `infos["listener"]["invalid"]`). The speaker's message is
never invalid unless it is not a string (then it counts as invalid and the listener reads "").

Evaluation with the message blanked: `blank_message=True` (constructor) or
`reset(options={"blank_message": True})`: the listener reads "Message: " with nothing after it, so
no information passes and a listener can do no better than chance (1/n). `reset(options={"target":
name or index})` fixes the target object (to evaluate every object).

Final-step infos (both agents): success (bool), target, choice (the named candidate or None),
blank_message.
"""

from __future__ import annotations

import re

from .base import TextParallelEnv, check_int, clean

__all__ = ["DEFAULT_OBJECTS", "SignalingEnv"]

DEFAULT_OBJECTS = ("apple", "boat", "candle", "drum", "egg", "feather", "guitar", "hammer", "igloo",
                   "jacket", "kite", "lemon", "mirror", "needle", "orange", "pencil", "quilt", "rope",
                   "spoon", "tiger", "umbrella", "violin", "whistle", "xylophone", "yacht", "zebra")
_NAME = re.compile(r"[a-z][a-z0-9]*")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


class SignalingEnv(TextParallelEnv):
    """Lewis signalling game. Arguments:
        n_objects      number of objects, the first n of DEFAULT_OBJECTS (2..26; default 10);
                       ignored when `objects` is given
        objects        the object names (at least 2, distinct, each [a-z][a-z0-9]*)
        message_chars  the longest message the listener reads (>= 1, default 32)
        shuffle        draw the candidates' order per episode (default True)
        blank_message  the listener reads an empty message (default False)
    """

    metadata = {"name": "signaling", "render_modes": ["ansi"], "is_parallelizable": True}
    possible_agents = ["speaker", "listener"]

    def __init__(self, n_objects: int = 10, objects: list[str] | tuple[str, ...] | None = None,
                 message_chars: int = 32, shuffle: bool = True, blank_message: bool = False,
                 render_mode: str | None = None):
        super().__init__(render_mode)
        if objects is None:
            n = check_int("signaling", "n_objects", n_objects, 2, len(DEFAULT_OBJECTS))
            objects = DEFAULT_OBJECTS[:n]
        if isinstance(objects, str) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"signaling: objects must be a list of names, got {objects!r}")
        objects = list(objects)
        bad = [o for o in objects if not _NAME.fullmatch(o)]
        if bad:
            raise ValueError(f"signaling: object name {bad[0]!r} is not allowed; names are one lower-case "
                             "word of letters and digits ([a-z][a-z0-9]*)")
        if len(objects) < 2 or len(set(objects)) != len(objects):
            raise ValueError(f"signaling: objects must be at least 2 distinct names, got {objects!r}")
        self.objects = objects
        self.message_chars = check_int("signaling", "message_chars", message_chars, 1)
        self.shuffle = bool(shuffle)
        self.blank_message = bool(blank_message)
        longest = max(len(o) for o in objects)
        obs_max = {"speaker": max(len("Object: ") + longest, len("Wait.")),
                   "listener": len("Message: \nCandidates: ") + self.message_chars
                   + sum(len(o) for o in objects) + 2 * (len(objects) - 1)}
        # An answer longer than this is still read; the bound only shapes the space (and sampling).
        self._init_spaces(obs_max, {"speaker": self.message_chars, "listener": 2 * longest + 16})
        self.target = self.objects[0]
        self.candidates = list(self.objects)
        self.message = ""
        self.choice: str | None = None
        self._blank = self.blank_message
        self._phase = 0

    def _new_episode(self, options: dict) -> None:
        target = options.get("target")
        if target is None:
            self.target = self.objects[int(self.np_random.integers(len(self.objects)))]
        elif isinstance(target, str) and target in self.objects:
            self.target = target
        elif not isinstance(target, (bool, str)) and isinstance(target, int) and 0 <= target < len(self.objects):
            self.target = self.objects[target]
        else:
            raise ValueError(f"signaling.reset: target must be one of {', '.join(self.objects)} or an index "
                             f"in [0, {len(self.objects) - 1}], got {target!r}")
        if self.shuffle:
            self.candidates = [self.objects[i] for i in self.np_random.permutation(len(self.objects))]
        else:
            self.candidates = list(self.objects)
        self._blank = bool(options.get("blank_message", self.blank_message))
        self.message = ""
        self.choice = None
        self._phase = 0

    def _turn(self) -> str:
        return "speaker" if self._phase == 0 else "listener"

    def parse_choice(self, answer: str) -> str | None:
        """The candidate an answer names, or None (no candidate, or several)."""
        named = {w for w in words(answer) if w in self.candidates}
        return named.pop() if len(named) == 1 else None

    def _act(self, agent: str, action: str | None) -> bool:
        if agent == "speaker":
            self.message = "" if action is None else clean(action, self.message_chars)
            self._phase = 1
            return action is None
        self.choice = None if action is None else self.parse_choice(action)
        self._phase = 2
        return self.choice is None

    def _done(self) -> bool:
        return self._phase == 2

    def _observe(self, agent: str) -> str:
        if agent == "speaker":
            return f"Object: {self.target}"
        message = "" if self._blank else self.message
        return f"Message: {message}\nCandidates: {', '.join(self.candidates)}"

    def _rewards(self) -> dict[str, float]:
        r = 1.0 if self._phase == 2 and self.choice == self.target else 0.0
        return {a: r for a in self.agents}

    def _outcome(self) -> dict:
        return {"success": self.choice == self.target, "target": self.target, "choice": self.choice,
                "blank_message": self._blank}

    def random_action(self, agent: str, rng) -> str:
        """speaker: the target's name half of the time, else an object drawn uniformly (a player who
        often says what it sees, as split_arith's players often send their number); listener: a
        candidate drawn uniformly, whatever the message (so random play succeeds 1 time in n)."""
        if agent == "speaker":
            return self.target if rng.random() < 0.5 else self.objects[int(rng.integers(len(self.objects)))]
        return self.candidates[int(rng.integers(len(self.candidates)))]
