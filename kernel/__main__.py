from llmos.kernel.boot import main
import sys

sys.exit(main())
