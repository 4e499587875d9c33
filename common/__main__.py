from psgrid.cli import main

main()
