"""This job, the NVFlare 2.9 way (Recipe API): `python jobs/clip_lora/job.py` runs it in the simulator.

    python jobs/clip_lora/job.py -w /tmp/fl -n 4                   # SimEnv: the same run as
                                                                   #   nvflare simulator jobs/clip_lora -w ws -n 4 -t 4
    python jobs/clip_lora/job.py --set r=8 --set aggregation='"ffa"' --set num_rounds=20
    python jobs/clip_lora/job.py --env poc                         # a running `nvflare poc` system
    python jobs/clip_lora/job.py --env prod --startup-kit /path/to/admin@org.com
    python jobs/clip_lora/job.py --export --export-dir out/        # write the job folder, run nothing

--set KEY=VALUE takes any setting of nvflare_lora.settings.JobSettings (the job schema); VALUE is JSON (strings quoted), or
a bare word taken as a string. An unknown setting or a bad value: one line naming it, exit status 2.
"""

import argparse
import json
import sys
import warnings

# --export/--export-dir are NVFlare's Recipe flags, which this script documents as its own: NVFlare's warning that it
# takes them off sys.argv (printed on every --export) says nothing to the user of this script
warnings.filterwarnings("ignore", message="NVFlare reserves '--export'", category=UserWarning)
from nvflare.recipe import PocEnv, ProdEnv, SimEnv  # first: it takes NVFlare's --export flags off sys.argv

from nvflare_lora.kits import admin_user
from nvflare_lora.recipe import CLIPLoRARecipe, RecipeError


def parse_settings(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RecipeError(f"--set {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python jobs/clip_lora/job.py", description=__doc__.splitlines()[0],
                                epilog="--export --export-dir DIR: write the job folder to DIR and run nothing "
                                       "(NVFlare's Recipe flags, read before these)")
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    p.add_argument("-w", "--workspace-root", default="/tmp/nvflare/simulation",
                   help="sim: the workspace is WORKSPACE_ROOT/clip_lora (default /tmp/nvflare/simulation)")
    p.add_argument("-n", "--num-clients", type=int, default=None, help="sim: sites (default: the job's num_sites)")
    p.add_argument("-t", "--threads", type=int, default=None, help="sim: sites run at once (default: all)")
    p.add_argument("--startup-kit", help="prod: the admin's startup kit folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a job setting (repeatable)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        recipe = CLIPLoRARecipe(**parse_settings(args.set))
        if args.env == "sim":
            n = args.num_clients or recipe.settings.num_sites
            env = SimEnv(num_clients=n, num_threads=args.threads or n, workspace_root=args.workspace_root)
        elif args.env == "poc":
            env = PocEnv()
        else:
            if not args.startup_kit:
                raise RecipeError("--env prod needs --startup-kit PATH (the admin's startup kit folder)")
            env = ProdEnv(startup_kit_location=args.startup_kit, username=admin_user(args.startup_kit))
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = recipe.execute(env)
    result = run.get_result(clean_up=False)  # keep the workspace: it holds the adapter and the logs
    print(f"job {run.get_job_id()} done; results in {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
