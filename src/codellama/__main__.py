import sys

from codellama.cli import main

sys.exit(main())
