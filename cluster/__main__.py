import sys

from llmos.cluster.serve import main

sys.exit(main())
