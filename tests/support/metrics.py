"""Reading the Prometheus text exposition in tests: samples, families, one value."""

import re

SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+-]+|NaN)$',
                    re.DOTALL)


def parse_exposition(text):
    types, samples = {}, []
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):  # the format separates lines by \n only
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            match = SAMPLE.match(line)
            assert match, f"malformed sample line: {line!r}"
            assert family_of(match.group(1), types), f"sample before its TYPE: {line!r}"
            samples.append((match.group(1), match.group(2) or "", float(match.group(3))))
    return types, samples


def family_of(name, types):
    """The TYPE'd family a sample name belongs to: itself, or a histogram's _bucket/_sum/_count."""
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base
    return None


def value(samples, name, **labels):
    found = [v for n, lb, v in samples if n == name and all(
        f'{k}="{val}"' in lb for k, val in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]
