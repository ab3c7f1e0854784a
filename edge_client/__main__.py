import sys

from fedprune.edge_client.cli import main

sys.exit(main())
