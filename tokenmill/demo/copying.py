"""Copy drills for the demo data: repeat made-up words, and recall a made-up name by its role.

A tool call must copy the listed name (and a place) out of the prompt: a word the model has
never seen, so only attention can supply it. Calls alone teach that too rarely for the skill to
appear: runs 9 and 10 wrote none of 201 made-up names (teacher-forced p < 0.01 on the first
token). These short samples put the loss almost only on copied tokens:

- ``repeat``: "Repeat after me: kelith Valmouth 4821" -> "kelith Valmouth 4821";
- ``recall``: a system prompt pairs made-up names with roles, in either order ("zoumar: works
  out a sum" names first, as tool schemas do) -> "Which one works out a sum?" -> "zoumar".
"""

from __future__ import annotations

import random

from tokenmill.demo import tools as tool_data


def _third_person(purpose: str) -> str:
    """"check the weather" -> "checks the weather": one table (``tools.PURPOSES``) words a
    tool's job both for the tool-list questions and for these drills."""
    verb, _, rest = purpose.partition(" ")
    verb += "es" if verb.endswith(("s", "sh", "ch", "x")) else "s"
    return f"{verb} {rest}"


ROLES = {kind: _third_person(p) for kind, p in tool_data.PURPOSES.items()}

_ASK_REPEAT = ["Repeat after me: {s}", "Say this back to me: {s}", "Copy this exactly: {s}",
               "Echo: {s}", "Please repeat: {s}", "Write {s} again."]
_ASK_RECALL = ["Which one {r}?", "Which name {r}?", "Who {r}?", "Name the one that {r}."]


def _item(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return tool_data.made_up_word(rng)
    if r < 0.6:
        return tool_data.made_up_tool_name(rng, rng.choice(list(ROLES)))
    if r < 0.8:
        return tool_data.made_up_place(rng)
    if r < 0.9:
        return str(rng.randint(0, 99999))
    return "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.randint(2, 5)))


def repeat(rng: random.Random) -> tuple[list[dict], str, dict]:
    text = " ".join(_item(rng) for _ in range(rng.randint(1, 4)))
    q = rng.choice(_ASK_REPEAT).format(s=text)
    return [{"role": "user", "content": q}], text, {
        "copy": text, "steps": "The user wants the same words back. I copy them."}


def recall(rng: random.Random) -> tuple[list[dict], str, dict]:
    roles = rng.sample(list(ROLES), rng.randint(2, 5))
    names = {r: tool_data.made_up_word(rng) if rng.random() < 0.5
             else tool_data.made_up_tool_name(rng, r) for r in roles}
    name_first = rng.random() < 0.5
    lines = [f"{names[r]}: {ROLES[r]}" if name_first else f"The one that {ROLES[r]} is {names[r]}."
             for r in roles]
    system = "You know these helpers:\n" + "\n".join(lines)
    role = rng.choice(roles)
    q = rng.choice(_ASK_RECALL).format(r=ROLES[role])
    return ([{"role": "system", "content": system}, {"role": "user", "content": q}], names[role],
            {"copy": names[role], "steps": f"The helper that {ROLES[role]} is {names[role]}."})


def copy_drill(rng: random.Random) -> tuple[list[dict], str, dict]:
    return repeat(rng) if rng.random() < 0.5 else recall(rng)
