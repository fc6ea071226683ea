# run the importable module, not a __main__ copy: the jobs Hydra's joblib launcher pickles then refer to
# guidance.bench.app by name (its cached xray scorer included) instead of to a __main__ a worker does not have
from guidance.bench.app import main

raise SystemExit(main())
