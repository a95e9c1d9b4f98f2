from qnas.cli import main

main()
