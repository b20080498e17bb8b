from radgrounder.cli import main

main()
