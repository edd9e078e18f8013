import sys

from vmsi_server.cli import main

sys.exit(main())
