#!/usr/bin/env python3
"""Parses an OpenMetrics exposition from stdin with prometheus_client's strict parser.

Exits 1 with the parser's error on stderr when the text breaks the format (a family split
in two, a sample without its family, no `# EOF`, ...). Otherwise prints one JSON object:
family name -> {"type": ..., "help": ..., "samples": [[name, labels, value], ...]}.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

try:
    families = list(text_string_to_metric_families(sys.stdin.read()))
except ValueError as e:
    print(f"openmetrics: {e}", file=sys.stderr)
    sys.exit(1)
out = {}
for f in families:
    if f.name in out:
        print(f"openmetrics: family {f.name} appears twice", file=sys.stderr)
        sys.exit(1)
    out[f.name] = {
        "type": f.type,
        "help": f.documentation,
        "samples": [[s.name, s.labels, s.value] for s in f.samples],
    }
json.dump(out, sys.stdout)
