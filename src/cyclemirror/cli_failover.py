"""The failover verbs of the command line (docs/failover.md): promote, switchover,
reinstate, resolve, clone.

Kept apart from ``cli.py`` so the verbs of disaster recovery grow in one place;
``cli.build_parser`` calls ``add_verbs`` with the ``mirror`` sub-parsers.
"""

from __future__ import annotations

import sys


def cmd_mirror_promote(args) -> int:
    from cyclemirror.cli import _call, _print_json

    request = {"image": args.image, "force": bool(args.force)}
    if args.as_name:
        request["as"] = args.as_name
    if args.path is not None:
        import os

        request["path"] = os.path.abspath(args.path)
    result = _call(args, "mirror.promote", reply_timeout=None, **request)
    if args.json:
        _print_json(result)
        return 0
    if result.get("kind") == "tree":
        forced = " (forced)" if result["forced"] else ""
        done = ("(finished a promotion made before)" if result["resumed"]
                else f"in {result['seconds']:.3f}s")
        sys.stdout.write(
            f"promoted tree {result['source_name'] or result['source_node']}/"
            f"{result['mirror']}{forced} to tree object {result['tree']} at {result['path']}: "
            f"writable now, as of cycle {result['cycle']} {done}\n"
            "the source is demoted: it is refused if it tries to mirror here again\n")
        return 0
    forced = " (forced)" if result["forced"] else ""
    source = result["source_name"] or result["source_node"]
    if result["group"]:
        made = f"group {source}/{result['mirror']} to volumes {', '.join(result['volumes'])}"
    else:
        made = f"{source}/{result['mirror']} to volume {result['volume']}"
    done = ("(finished a promotion cut short before)" if result["resumed"]
            else f"in {result['seconds']:.3f}s")
    sys.stdout.write(
        f"promoted {made}{forced}: writable now, as of cycle {result['cycle']}"
        f"{' (every member)' if result['group'] else ''}; generation {result['generation']} "
        f"(branched from {result['parent']}) {done}\n"
        f"the source is demoted: it is refused if it tries to mirror here again\n")
    return 0


def cmd_mirror_resolve(args) -> int:
    from cyclemirror.cli import _call, _print_json

    result = _call(args, "mirror.resolve", volume=args.volume,
                   discard_changes_on=args.discard_changes_on)
    if args.json:
        _print_json(result)
        return 0
    loser = result["discard_changes_on_name"] or result["discard_changes_on"]
    if result.get("discarded_here"):
        kept = ", ".join(k["path"] for k in result["kept"]) or "none were written"
        sys.stdout.write(f"split brain on {', '.join(result['volumes'])}: this node's changes "
                         f"since cycle {result['cycle']} lose (kept in: {kept}); "
                         f"{'they are' if len(result['volumes']) > 1 else 'it is'} the mirror "
                         f"image {result['image']} again. Next, {result['next']}\n")
        return 0
    sys.stdout.write(f"split brain on {result['volume']}: {loser}'s changes lose; they are "
                     f"kept in a file on {loser} when the failback starts ('cyclemirror "
                     f"mirror resume {result['volume']}' if the mirror is broken)\n")
    return 0


def cmd_mirror_switchover(args) -> int:
    from cyclemirror.cli import _call, _print_json
    from cyclemirror.units import parse_seconds

    request = {"volume": args.volume, "to": args.to,
               "timeout": parse_seconds(args.timeout, "--timeout", allow_zero=False)}
    if args.back_to:
        request["back_to"] = args.back_to
    if args.target_path:
        request["path"] = args.target_path
    result = _call(args, "mirror.switchover", reply_timeout=None, **request)
    if args.json:
        _print_json(result)
        return 0
    back = result["mirroring_back_to"]
    what = (f"group {result['group']} ({', '.join(result['volumes'])})" if result.get("group")
            else result["volume"])
    sys.stdout.write(
        f"switched {what} over to {result['to']} after cycle {result['cycle']} "
        + (f"(writes held {result['writes_held_seconds']:.2f}s)"
           if result.get("writes_held_seconds") is not None
           else f"(a {result.get('kind', 'file')} object: its writers were not held)")
        + ": it is primary now, generation "
        f"{result['generation']}; this node is demoted"
        + (f" and {result['to']} mirrors back to {back}\n" if back else "\n"))
    return 0


def cmd_mirror_reinstate(args) -> int:
    from cyclemirror.cli import _call, _print_json

    result = _call(args, "mirror.reinstate", reply_timeout=None, volume=args.volume,
                   force=bool(args.force))
    if args.json:
        _print_json(result)
        return 0
    what = (f"group {result['group']} ({', '.join(result['volumes'])})" if result["group"]
            else result["volume"])
    asked = "; ".join(f"{a['target']} {a['answer']}"
                      + (f" (cycle {a['applied_cycle']})" if a.get("applied_cycle") else "")
                      for a in result["asked"]) or "no target to ask"
    sys.stdout.write(f"reinstated {what} as primary: writable again ({asked})"
                     + ("; its mirror resumed\n" if result["mirror_resumed"] else "\n"))
    if result["risk"]:
        sys.stderr.write(f"warning: forced: {result['risk']}\n")
    return 0


def cmd_mirror_clone(args) -> int:
    from cyclemirror.cli import _call, _print_json

    result = _call(args, "mirror.clone", reply_timeout=None, image=args.image,
                   name=args.name)
    if args.json:
        _print_json(result)
        return 0
    if result.get("kind") == "file":
        sys.stdout.write(f"cloned {result['source_name'] or result['source_node']}/"
                         f"{result['mirror']} at cycle {result['cycle']} to file "
                         f"{result['path']} ({result['seconds']:.2f}s): writable, mirroring "
                         "into the image goes on; it is yours to delete\n")
        return 0
    if result.get("kind") == "tree":
        sys.stdout.write(f"cloned tree {result['source_name'] or result['source_node']}/"
                         f"{result['mirror']} at cycle {result['cycle']} to {result['path']} "
                         f"({'a writable snapshot' if result['how'] == 'snapshot' else 'a copy'}"
                         f", {result['seconds']:.2f}s): writable, the mirror keeps cycling; "
                         "it is yours to delete\n")
        return 0
    sys.stdout.write(f"cloned {result['source_name'] or result['source_node']}/"
                     f"{result['mirror']} at cycle {result['cycle']} to volume "
                     f"{result['volume']} ({result['seconds']:.2f}s): writable, mirroring into "
                     f"the image goes on; remove it with 'cyclemirror volume rm "
                     f"{result['volume']}'\n")
    return 0


def add_verbs(mverbs) -> None:
    promote = mverbs.add_parser(
        "promote", help="on a target: make an incoming mirror image a writable volume "
                        "(failover), without copying it",
        description="The image as of its last applied cycle becomes volume VOLUME (or "
                    "--as NAME) of this store, served over NBD; a half-received cycle is "
                    "discarded. A consistency group's mirror is promoted whole: every "
                    "member becomes a volume under its name, all as of one group cycle. "
                    "Refused (exit 10) while the source is connected, unless "
                    "--force. The source is recorded as demoted: when it comes back it is "
                    "refused and reports it. Safe to run again after a crash "
                    "(docs/failover.md).")
    promote.add_argument("image", metavar="SOURCE/VOLUME",
                         help="the source's node name (or id) and the volume, as 'status' "
                              "lists; for a consistency group its mirror "
                              "(SOURCE/GROUP-xxxxxxxx): every member is promoted, all as of "
                              "the same group cycle")
    promote.add_argument("path", metavar="PATH", nargs="?",
                         help="for a tree mirror: where the promoted tree is made (a new "
                              "btrfs subvolume, registered as tree object NAME)")
    promote.add_argument("--as", dest="as_name", metavar="NAME",
                         help="the new volume's name (default: the volume's; not for a group)")
    promote.add_argument("--force", action="store_true",
                         help="promote even though the source is connected (it is cut off)")
    promote.add_argument("--json", action="store_true", help="print the documented JSON")
    promote.set_defaults(func=cmd_mirror_promote)
    switch = mverbs.add_parser(
        "switchover", help="on the source: planned role swap with the target, zero loss",
        description="Holds new writes (NBD writes fail with EPERM, reads go on), ships a final "
                    "cycle, has the target promote its image, demotes this volume and has the "
                    "target mirror back to this node. Every write acknowledged before it is on "
                    "the new primary. A group member switches its whole group "
                    "(docs/failover.md).")
    switch.add_argument("volume", metavar="VOLUME",
                        help="the volume; a member of a consistency group switches the whole "
                             "group")
    switch.add_argument("--to", required=True, metavar="HOST:PORT",
                        help="the target that becomes primary (one of the volume's targets)")
    switch.add_argument("--back-to", metavar="HOST:PORT",
                        help="where the new primary reaches this node (default: its --listen)")
    switch.add_argument("--target-path", metavar="PATH",
                        help="a tree object: the path on the target the promoted tree is made "
                             "at (default: the tree's path here)")
    switch.add_argument("--timeout", default="300", metavar="SECONDS",
                        help="for the final cycle (default 300)")
    switch.add_argument("--json", action="store_true", help="print the documented JSON")
    switch.set_defaults(func=cmd_mirror_switchover)
    reinstate = mverbs.add_parser(
        "reinstate", help="on a demoted former primary: make it primary again when no "
                          "target promoted its copy",
        description="Asks every target of the volume's mirror whether it promoted its copy "
                    "(for instance after a switchover whose answer was lost). If none did, "
                    "the volume is primary and writable again and its mirror resumes; a "
                    "target that promoted refuses it (exit 10: fail back from it instead). "
                    "A member of a consistency group reinstates the whole group "
                    "(docs/failover.md).")
    reinstate.add_argument("volume", metavar="VOLUME",
                           help="the demoted volume; a group member reinstates its group")
    reinstate.add_argument("--force", action="store_true",
                           help="go on when a target cannot be reached (if it did promote, "
                                "both sides are primary until a failback settles it)")
    reinstate.add_argument("--json", action="store_true", help="print the documented JSON")
    reinstate.set_defaults(func=cmd_mirror_reinstate)
    clone = mverbs.add_parser(
        "clone", help="on a target: a writable volume from an incoming image, or a "
                      "writable tree from a tree mirror, for a test failover, while "
                      "mirroring goes on",
        description="Volume NAME starts as the image's latest applied cycle (a reflink where "
                    "the file system has one, else a sparse copy of its data); its writes "
                    "never reach the image, whose cycles keep applying. 'volume rm NAME' "
                    "removes it. Give an absolute PATH instead (it must not exist, outside the "
                    "store) for "
                    "a plain file of the image (a reflink where it can be), or, for a tree "
                    "mirror, a writable btrfs snapshot of the last applied cycle where it can "
                    "be, else a copy (docs/trees.md).")
    clone.add_argument("image", metavar="SOURCE/VOLUME",
                       help="the source's node name (or id) and the volume or tree, as "
                            "'status' lists")
    clone.add_argument("name", metavar="NAME|PATH",
                       help="the new volume's name, or the new file's (or tree's) absolute path")
    clone.add_argument("--json", action="store_true", help="print the documented JSON")
    clone.set_defaults(func=cmd_mirror_clone)
    resolve = mverbs.add_parser(
        "resolve", help="on a promoted volume: settle a split brain by naming the side whose "
                        "changes lose",
        description="Both sides wrote since their last common cycle: the failback mirror is "
                    "refused (exit 6, SplitBrainError) until a person names the loser. Its "
                    "divergent blocks are kept in a file on that node (status lists it) and "
                    "the mirror goes on as a delta. Naming the old primary: resume the "
                    "mirror here. Naming this node (the new primary): its writes since the "
                    "promotion are kept in a file here, its volume becomes the old primary's "
                    "mirror image again at once, and the old primary takes over with "
                    "'mirror reinstate' and ships only its own changes. A member of a "
                    "promoted group speaks for the whole group.")
    resolve.add_argument("volume", metavar="VOLUME")
    resolve.add_argument("--discard-changes-on", required=True, metavar="NODE",
                         help="the node (name or id) whose changes since the common cycle lose")
    resolve.add_argument("--json", action="store_true", help="print the documented JSON")
    resolve.set_defaults(func=cmd_mirror_resolve)
