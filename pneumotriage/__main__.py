from pneumotriage.cli import main

main()
